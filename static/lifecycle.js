// Keep the session page live: poll /api/lifecycle, tick the countdowns, draw the timeline.
// Polling goes through the server's sign-in hook, so the poll that finds the access token due
// is the request that refreshes it: the page shows a real silent refresh, not a simulation.
(function () {
  "use strict";

  var root = document.getElementById("lifecycle");
  if (!root) return;
  var SVG = "http://www.w3.org/2000/svg";
  var POLL_MS = 10000;
  var url = root.dataset.url;
  var state = null; // the last answer; its offsets count in seconds from `base`
  var base = 0; // Date.now() when that answer arrived, so the client clock never needs to agree with the server's
  var pollTimer = null;
  var tickTimer = null;

  function $(id) { return document.getElementById(id); }

  var set = window.PageFormat.set;
  var duration = window.PageFormat.duration;
  var clock = window.PageFormat.clock;

  var day = window.PageFormat.moment;

  // An instant in client milliseconds, from an offset in seconds relative to the answer's "now".
  function at(offset) { return base + offset * 1000; }

  function say(message, kind, link) {
    window.PageFormat.status("live-status", message, kind, link);
  }

  function poll() {
    clearTimeout(pollTimer);
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (reply) {
        if (reply.status === 401) {
          signedOut();
          return null;
        }
        return reply.json().then(function (body) {
          if (!reply.ok) throw new Error(body.message || "The server answered " + reply.status + ".");
          return body;
        });
      })
      .then(function (body) {
        if (!body) return;
        receive(body);
        schedule();
      })
      .catch(function (error) {
        say(error.message + " Trying again in a few seconds.", "warn");
        pollTimer = setTimeout(poll, 5000);
      });
  }

  // Ask again soon after the refresh falls due, so the refresh happens while the person watches.
  function schedule() {
    var wait = POLL_MS;
    var due = at(state.access.refresh_in) - Date.now() + 750;
    if (due > 0 && due < wait) wait = due;
    pollTimer = setTimeout(poll, Math.max(1000, wait));
  }

  function signedOut() {
    clearTimeout(pollTimer);
    clearInterval(tickTimer);
    root.classList.add("signed-out");
    window.PageFormat.signedOutHeader();
    say("You are signed out here: this device was signed out, or your sign-in ended.", "warn", {
      href: "/auth/login?next=" + encodeURIComponent(location.pathname),
      text: "Sign in again",
    });
  }

  function receive(data) {
    var previous = state;
    base = Date.now();
    state = data;
    var newest = previous && previous.refreshes.length ? previous.refreshes[0].id : 0;
    var fresh = previous ? data.refreshes.filter(function (e) { return e.id > newest; }) : [];
    if (fresh.length) announce(fresh);
    set("last-checked", "Last checked " + clock(base) + "; checking again every few seconds.");
    set("rotations", String(data.refresh.refreshes_here));
    set("rotations-word", data.refresh.refreshes_here === 1 ? "refresh" : "refreshes");
    set("last-rotation", data.refresh.last_rotation);
    set("sessions", String(data.sessions));
    set("viewer-scope", data.viewer.scope || "–");
    setTime("access-expires", data.access.expires_in, clock);
    setTime("refresh-at", data.access.refresh_in, clock);
    setTime("refresh-expires", data.refresh.expires_in, day);
    renderTable(data.refreshes);
    tick();
  }

  function announce(events) {
    var access = events.filter(function (e) { return e.kind === "access"; })[0] || events[0];
    var when = clock(at(-access.ago));
    if (access.outcome === "refreshed") {
      say("Silently refreshed your " + access.kind + " token at " + when + ", triggered by " + access.trigger +
          ". It rotated your refresh token (" + state.refresh.refreshes_here + " silent " +
          (state.refresh.refreshes_here === 1 ? "refresh" : "refreshes") + " since you signed in here).", "ok");
      root.classList.remove("flash");
      void root.offsetWidth; // restart the highlight animation
      root.classList.add("flash");
    } else if (access.outcome === "lost_rotation") {
      say("At " + when + " the provider rotated your refresh token but its reply was lost, so that sign-in ended;" +
          " you were signed in again through the provider.", "warn");
    } else {
      say("A refresh at " + when + " ended with " + access.outcome + ".", "warn");
    }
  }

  function setTime(id, offset, format) {
    var el = $(id);
    if (!el || offset === null) return;
    var ms = at(offset);
    el.dateTime = new Date(ms).toISOString();
    el.textContent = format(ms);
  }

  function renderTable(events) {
    var body = $("refreshes");
    var rows = events.map(function (e) {
      var tr = document.createElement("tr");
      var waited = e.waiters ? e.waiters + (e.waiters === 1 ? " request" : " requests") : "–";
      [clock(at(-e.ago)), e.kind, e.outcome + (e.ahead ? " ahead of expiry" : ""), e.trigger, waited, e.duration_ms + " ms"].forEach(function (text, i) {
        var td = document.createElement("td");
        if (i === 3) {
          td.append(window.PageFormat.breakable(text));
        } else {
          td.textContent = text;
        }
        if (i === 2) td.className = "outcome-" + e.outcome;
        tr.append(td);
      });
      return tr;
    });
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = 6;
      td.textContent = "No refresh yet: your access token has not needed one.";
      tr.append(td);
      rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
    window.PageFormat.scrollCues();
  }

  function tick() {
    if (!state) return;
    var now = Date.now();
    var since = (now - base) / 1000;
    var a = state.access;
    var left = a.expires_in - since;
    set("access-countdown", left > 0 ? duration(left) : "expired");
    var due = a.refresh_in - since;
    set("refresh-countdown", due > 0 ? "in " + duration(due) : "due now");
    root.classList.toggle("refresh-due", due <= 0);
    set("refresh-age", duration(state.refresh.age + since));
    set("refresh-expires-in", duration(state.refresh.expires_in - since));
    set("signed-in-ago", duration(state.signed_in_ago + since));
    set("signed-in-where", state.signed_in_elsewhere
      ? ", on another device; this one signed in " + duration(state.here_signed_in_ago + since) + " ago"
      : "");
    var v = state.viewer;
    if (v.expires_in === null) set("viewer-countdown", "not fetched yet");
    else if (v.expires_in - since > 0) set("viewer-countdown", "in " + duration(v.expires_in - since));
    else set("viewer-countdown", "expired; the viewer gets a new one when it next asks");
    draw(now);
  }

  // --- the picture -------------------------------------------------------------------------

  function el(name, attrs, title) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (key) { node.setAttribute(key, attrs[key]); });
    if (title) {
      var t = document.createElementNS(SVG, "title");
      t.textContent = title;
      node.append(t);
    }
    return node;
  }

  function bar(from, to, cls, scale, title) {
    var x = scale(from);
    return el("rect", { x: x + "%", y: "20%", width: Math.max(0, scale(to) - x) + "%", height: "60%", rx: 3, class: cls }, title);
  }

  function nowLine(x) {
    return el("line", { x1: x + "%", x2: x + "%", y1: "0", y2: "100%", class: "now" });
  }

  function lifeBar(start, end, dueAt, now, scale, label) {
    return [
      el("rect", { x: "0", y: "0", width: "100%", height: "100%", class: "track-bg" }),
      bar(start, end, "life", scale, label + " valid " + clock(start) + " – " + clock(end)),
      bar(dueAt, end, "zone", scale, "Refresh zone from " + clock(dueAt)),
      bar(start, Math.min(now, end), "used", scale),
      nowLine(scale(now)),
    ];
  }

  function draw(now) {
    var s = state;
    var a = s.access;
    var leeway = s.leeway_seconds;
    var aStart = at(-(a.issued_ago || 0));
    var aEnd = at(a.expires_in);
    // Show some time before the token was issued, reaching back to the last few refreshes when they
    // are recent, so a run of silent refreshes stays in view.
    var span = Math.max(aEnd - aStart, 1000);
    var start = Math.min(aStart, now) - span * 0.25;
    s.refreshes.slice(0, 4).forEach(function (e) {
      var t = at(-e.ago);
      if (t >= aStart - span) start = Math.min(start, t - span * 0.05);
    });
    var end = Math.max(aEnd, now) + span * 0.05;
    var scale = function (t) { return Math.min(100, Math.max(0, ((t - start) / (end - start)) * 100)); };

    $("track-access").replaceChildren.apply($("track-access"), lifeBar(aStart, aEnd, at(a.refresh_in), now, scale, "Access token"));

    var v = s.viewer;
    var viewer = [el("rect", { x: "0", y: "0", width: "100%", height: "100%", class: "track-bg" })];
    if (v.expires_in !== null && v.issued_ago !== null) {
      var vEnd = at(v.expires_in);
      viewer = lifeBar(at(-v.issued_ago), vEnd, vEnd - leeway * 1000, now, scale, "Viewer token");
    } else {
      viewer.push(nowLine(scale(now)));
    }
    $("track-viewer").replaceChildren.apply($("track-viewer"), viewer);

    var events = [el("rect", { x: "0", y: "0", width: "100%", height: "100%", class: "track-bg" })];
    var shown = 0;
    s.refreshes.forEach(function (e) {
      var t = at(-e.ago);
      if (t < start) return;
      shown += 1;
      var cls = "event event-" + e.kind + (e.outcome === "refreshed" ? "" : " event-failed");
      events.push(el("circle", { cx: scale(t) + "%", cy: "50%", r: 6, class: cls }, e.kind + " " + e.outcome + " at " + clock(t) + " (" + e.trigger + ")"));
    });
    events.push(nowLine(scale(now)));
    $("track-events").replaceChildren.apply($("track-events"), events);

    var r = s.refresh;
    var age = r.age + (now - base) / 1000;
    var used = Math.max(0.4, Math.min(100, (age / r.lifetime) * 100));
    $("track-refresh").replaceChildren(
      el("rect", { x: "0", y: "0", width: "100%", height: "100%", class: "track-bg" }),
      el("rect", { x: "0", y: "20%", width: "100%", height: "60%", rx: 3, class: "life life-refresh" }),
      el("rect", { x: "0", y: "20%", width: used + "%", height: "60%", rx: 3, class: "used" }),
      nowLine(used)
    );

    set("axis-start", clock(start));
    set("axis-end", clock(end));
    set("timeline-summary",
      "Access token valid from " + clock(aStart) + " to " + clock(aEnd) + "; silent refresh due from " +
      clock(at(a.refresh_in)) + ". " + shown + " recent refreshes shown.");
  }

  document.documentElement.classList.add("js");
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") poll();
  });
  tickTimer = setInterval(tick, 1000);
  poll();
})();
