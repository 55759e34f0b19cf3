// Node-RED settings for the integration test (tests/tests/integration_nodered_e2e.rs):
// headless (no editor, no HTTP listener), credentials in plain text (flows_cred.json
// holds only the MQTT username, the integration identity's name, which is not a secret:
// its certificate is the credential).
module.exports = {
    credentialSecret: false,
    httpAdminRoot: false,
    httpNodeRoot: false,
    logging: { console: { level: "info", metrics: false, audit: false } },
    editorTheme: { projects: { enabled: false } },
};
