// Drover console: the only script. Two jobs, nothing else:
// 1. live updates: every few seconds, fetch this page again with If-None-Match and swap
//    the regions marked data-live (by id) when the server says it changed (200, not 304);
// 2. confirmation: a form with data-confirm asks before it is sent (and then carries
//    confirmed=yes; without this script the server asks on a page of its own).
(function () {
  "use strict";
  var etag = null;
  var POLL_MS = 2000;

  function swap(html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var changed = 0;
    document.querySelectorAll("[data-live][id]").forEach(function (old) {
      var fresh = doc.getElementById(old.id);
      if (fresh && fresh.innerHTML !== old.innerHTML) {
        // Keep keyboard focus where it was when the focused element survives the swap.
        var focused = document.activeElement;
        var focusKey = focused && old.contains(focused) ? focused.getAttribute("href") || focused.id : null;
        old.innerHTML = fresh.innerHTML;
        changed++;
        if (focusKey) {
          var again = old.querySelector('[href="' + focusKey + '"]') || document.getElementById(focusKey);
          if (again) again.focus();
        }
      }
    });
    if (changed) document.body.setAttribute("data-refreshed", String(Date.now()));
  }

  function poll() {
    if (document.hidden || !document.querySelector("[data-live]")) return;
    var headers = {};
    if (etag) headers["If-None-Match"] = etag;
    fetch(location.href, { headers: headers, credentials: "same-origin", redirect: "manual" })
      .then(function (r) {
        if (r.status === 200) {
          etag = r.headers.get("ETag");
          return r.text().then(swap);
        }
      })
      .catch(function () { /* the next poll tries again */ });
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute("data-confirm");
    if (!question) return;
    if (!window.confirm(question)) {
      ev.preventDefault();
      return;
    }
    var c = form.querySelector('input[name="confirmed"]');
    if (c) c.value = "yes";
  });

  setInterval(poll, POLL_MS);
})();
