// casern inspector: live refresh, nothing else. The pages work without it.
// With "Live" on, the page fetches itself every few seconds and swaps in the
// fresh <main> (server-rendered, escaped HTML; parsed, never executed).
(function () {
  "use strict";
  var KEY = "casern-inspector-live";
  var EVERY = 3000;
  var box = document.getElementById("live");
  if (!box) return;
  box.checked = localStorage.getItem(KEY) === "1";
  box.addEventListener("change", function () {
    localStorage.setItem(KEY, box.checked ? "1" : "0");
    if (box.checked) refresh();
  });

  function busy() {
    var el = document.activeElement;
    return document.hidden || String(window.getSelection()) !== "" ||
      (el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "checkbox")));
  }

  function refresh() {
    if (!box.checked || busy()) return;
    fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null) return;
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (fresh && main && fresh.innerHTML !== main.innerHTML && !busy()) {
          main.replaceWith(document.importNode(fresh, true));
        }
      })
      .catch(function () { /* the server is restarting: try again next time */ });
  }
  setInterval(refresh, EVERY);
})();
