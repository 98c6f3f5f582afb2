// Small helpers the live pages share: write text only when it changed, and say times in words.
(function () {
  "use strict";

  function set(id, text) {
    var el = document.getElementById(id);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  // Times are the browser's own, with its zone named: the server only knows UTC.
  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short" });
  }

  function moment(ms) {
    return new Date(ms).toLocaleString([], {
      day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", timeZoneName: "short",
    });
  }

  // The header follows when a page learns it is signed out (a sign-out from another device): no name, no Sign out.
  function signedOutHeader() {
    var header = document.querySelector("header.site");
    var account = header && header.querySelector(".account");
    if (!account || header.dataset.signedOut) return;
    var nav = header.querySelector("nav");
    if (nav) nav.remove();
    var link = document.createElement("a");
    link.className = "button primary";
    link.href = "/auth/login?next=" + encodeURIComponent(location.pathname);
    link.textContent = "Sign in";
    account.replaceChildren(link);
    header.dataset.signedOut = "1";
  }

  // A path, id or trigger in <code> that may break only after a "/", ":" or "?" (templates/macros.html does the same).
  function breakable(text) {
    var code = document.createElement("code");
    code.className = "breakable";
    text.split(" ").forEach(function (word, i) {
      if (i) code.append(" ");
      (word.match(/[^/:?]*[/:?]+|[^/:?]+$/g) || [word]).forEach(function (part, j) {
        if (j) code.append(document.createElement("wbr"));
        var span = document.createElement("span");
        span.textContent = part;
        code.append(span);
      });
    });
    return code;
  }

  // A table wider than its box scrolls sideways: say so above it, naming the columns out of sight.
  function scrollCues() {
    document.querySelectorAll(".table-wrap").forEach(function (wrap) {
      var cue = wrap.previousElementSibling;
      if (!cue || !cue.classList.contains("scroll-cue")) {
        cue = document.createElement("p");
        cue.className = "scroll-cue";
        cue.setAttribute("aria-hidden", "true"); // a screen reader reads every column anyway
        wrap.before(cue);
        wrap.addEventListener("scroll", scrollCues, { passive: true });
      }
      var edge = wrap.scrollLeft + wrap.clientWidth + 1;
      var hidden = Array.prototype.filter.call(wrap.querySelectorAll("thead th"), function (th) {
        return th.offsetLeft + th.offsetWidth > edge;
      }).map(function (th) { return th.textContent; });
      var scrolls = wrap.scrollWidth > wrap.clientWidth + 1;
      wrap.classList.toggle("scrolls", scrolls);
      cue.hidden = !scrolls;
      cue.textContent = hidden.length ? "Scroll the table sideways for " + hidden.join(", ") + " →" : "Scroll the table sideways to see it all ←";
    });
  }

  // A page's status line: a message, styled by kind ("error", "ok"...), with an optional link after it.
  function status(id, message, kind, link) {
    var el = document.getElementById(id);
    el.className = "status" + (kind ? " status-" + kind : "");
    el.textContent = message;
    if (link) {
      var a = document.createElement("a");
      a.href = link.href;
      a.textContent = link.text;
      el.append(" ", a);
    }
  }

  // The server writes UTC into every <time>; show the browser's local time instead.
  document.querySelectorAll("time[datetime]").forEach(function (el) {
    var ms = Date.parse(el.getAttribute("datetime"));
    if (!isNaN(ms)) el.textContent = moment(ms);
  });

  scrollCues();
  window.addEventListener("resize", scrollCues);

  window.PageFormat = {
    set: set, duration: duration, clock: clock, moment: moment, signedOutHeader: signedOutHeader, status: status, breakable: breakable, scrollCues: scrollCues,
  };
})();
