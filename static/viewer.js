// The viewer demo: get the narrow viewer token from /api/viewer-token and renew it before it expires,
// the way a browser-side viewer (APS Viewer's getAccessToken callback) does.
(function () {
  "use strict";

  var root = document.getElementById("viewer-demo");
  if (!root) return;
  var url = root.dataset.url;
  var leeway = Number(root.dataset.leeway) || 0;
  var current = null; // {token, scope, expiresAt, renewAt} in client milliseconds
  var received = []; // tokens this page got, newest first
  var timer = null;
  var AUTHORIZED_AT = "viewer-authorized-at"; // sessionStorage: when this tab last went through the provider for a token

  function $(id) { return document.getElementById(id); }

  var set = window.PageFormat.set;
  var duration = window.PageFormat.duration;
  var clock = window.PageFormat.clock;

  // Never show a whole token on screen: the first characters tell renewals apart.
  function truncate(token) { return token.slice(0, 8) + "…"; }

  function say(message, kind, link) {
    window.PageFormat.status("viewer-status", message, kind, link);
  }

  function getToken() {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" }).then(function (reply) {
      return reply.json().then(function (body) {
        if (reply.status === 401 && body.error === "viewer_authorization_needed") {
          var needed = new Error(body.message);
          needed.authorize = body.authorize_url;
          throw needed;
        }
        if (reply.status === 401) {
          var error = new Error("You are signed out.");
          error.signedOut = true;
          throw error;
        }
        if (!reply.ok) throw new Error(body.message || "The server answered " + reply.status + ".");
        return body;
      });
    });
  }

  function renew() {
    clearTimeout(timer);
    getToken()
      .then(function (body) {
        sessionStorage.removeItem(AUTHORIZED_AT);
        var now = Date.now();
        var isNew = !current || current.token !== body.access_token;
        // The server hands out the same token until it is within the leeway of expiry, so ask just after that.
        var wait = body.expires_in - leeway + 1;
        if (wait < 5) wait = Math.max(5, body.expires_in / 2);
        current = { token: body.access_token, scope: body.scope, expiresAt: now + body.expires_in * 1000, renewAt: now + wait * 1000 };
        if (isNew) {
          received.unshift({ at: now, token: truncate(body.access_token), scope: body.scope, expiresIn: body.expires_in });
          received = received.slice(0, 8);
          if (received.length > 1) say("Renewed the viewer token at " + clock(now) + ".", "ok");
          render();
        }
        timer = setTimeout(renew, wait * 1000);
        tick();
      })
      .catch(function (error) {
        if (error.authorize) {
          authorize(error.authorize);
          return;
        }
        if (error.signedOut) {
          window.PageFormat.signedOutHeader();
          say("You are signed out.", "warn", { href: "/auth/login?next=" + encodeURIComponent(location.pathname), text: "Sign in again" });
          return;
        }
        say(error.message + " Trying again in a few seconds.", "warn");
        timer = setTimeout(renew, 5000);
      });
  }

  // With OAUTH_VIEWER_TOKEN=authorize the token comes from an authorization of its own: the page goes
  // through the provider for a new one and comes back. Not twice in a row without a token in between
  // (the mark is cleared when one arrives), so a provider whose tokens are stale on arrival cannot keep
  // the browser going round.
  function authorize(href) {
    var target = href + "?next=" + encodeURIComponent(location.pathname + location.search);
    var last = Number(sessionStorage.getItem(AUTHORIZED_AT)) || 0;
    if (Date.now() - last < 60000) {
      say("The provider gave the viewer no token that lasts.", "warn", { href: target, text: "Try again" });
      return;
    }
    sessionStorage.setItem(AUTHORIZED_AT, String(Date.now()));
    say("Getting the viewer a new token from the provider…", "ok");
    location.assign(target);
  }

  function render() {
    set("viewer-scope", current.scope);
    set("viewer-token", truncate(current.token));
    set("viewer-renewals", String(received.length - 1));
    var rows = received.map(function (r) {
      var tr = document.createElement("tr");
      [clock(r.at), r.token, r.scope, duration(r.expiresIn)].forEach(function (text, i) {
        var td = document.createElement("td");
        if (i === 1 || i === 2) {
          var code = document.createElement("code");
          code.textContent = text;
          td.append(code);
        } else {
          td.textContent = text;
        }
        tr.append(td);
      });
      return tr;
    });
    $("viewer-log").replaceChildren.apply($("viewer-log"), rows);
    window.PageFormat.scrollCues();
  }

  function tick() {
    if (!current) return;
    var now = Date.now();
    var left = (current.expiresAt - now) / 1000;
    set("viewer-countdown", left > 0 ? duration(left) : "expired");
    var renewIn = (current.renewAt - now) / 1000;
    set("viewer-renew", renewIn > 0 ? "in " + duration(renewIn) : "now");
  }

  // With OAUTH_PROVIDER=autodesk the page also loads the APS Viewer, which calls this for its token.
  function startApsViewer() {
    var Viewing = window.Autodesk.Viewing;
    var options = {
      env: "AutodeskProduction2",
      api: "streamingV2",
      getAccessToken: function (onSuccess) {
        getToken().then(function (body) { onSuccess(body.access_token, body.expires_in); });
      },
    };
    Viewing.Initializer(options, function () {
      var viewer = new Viewing.GuiViewer3D($("aps-viewer"));
      viewer.start();
      var urn = root.dataset.urn;
      if (!urn) return;
      Viewing.Document.load("urn:" + urn, function (doc) {
        viewer.loadDocumentNode(doc, doc.getRoot().getDefaultGeometry());
      }, function (code) {
        say("The viewer could not load that model (error " + code + ").", "warn");
      });
    });
  }

  setInterval(tick, 1000);
  renew();
  if (window.Autodesk && window.Autodesk.Viewing) startApsViewer();
})();
