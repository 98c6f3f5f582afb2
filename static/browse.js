// The hubs browser: a tree (WAI-ARIA treeview pattern) of hubs, projects, folders and files that loads
// each level when it is first opened, through this server's /api/aps/ proxy, following links.next.
(function () {
  "use strict";

  var root = document.getElementById("browse");
  if (!root) return;
  var tree = document.getElementById("hubs-tree");
  var apiPrefix = root.dataset.api; // "/api/aps/"
  var upstream = root.dataset.upstream; // the API host the proxy forwards to, as its links name it
  var viewer = root.dataset.viewer;
  // A folder of thousands of files stops here rather than holding the page.
  var MAX_PAGES = 20;
  var labels = 0;

  function say(message, kind, link) {
    window.PageFormat.status("browse-status", message, kind, link);
  }

  // The API names its links by the API host; ask the same path and query of the proxy instead.
  function viaProxy(href) {
    if (!href || href.indexOf(upstream + "/") !== 0) return null;
    return apiPrefix + href.slice(upstream.length + 1);
  }

  function get(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" }).then(function (reply) {
      return reply.json().catch(function () { return {}; }).then(function (body) {
        if (reply.status === 401) {
          var error = new Error("You are signed out.");
          error.signedOut = true;
          throw error;
        }
        if (!reply.ok) {
          var detail = body.message || (body.errors && body.errors[0] && body.errors[0].detail) || body.developerMessage;
          throw new Error(detail || "The server answered " + reply.status + ".");
        }
        return body;
      });
    });
  }

  // Read every page of a list, following links.next; resolve with {data, included}.
  function getAll(url) {
    var data = [];
    var included = [];
    function page(next, count) {
      return get(next).then(function (body) {
        data = data.concat(body.data || []);
        included = included.concat(body.included || []);
        var more = body.links && body.links.next && viaProxy(body.links.next.href);
        if (more && count < MAX_PAGES) return page(more, count + 1);
        return { data: data, included: included };
      });
    }
    return page(url, 1);
  }

  function related(entry, name) {
    var rel = entry.relationships && entry.relationships[name];
    return rel && rel.links && rel.links.related ? viaProxy(rel.links.related.href) : null;
  }

  // What each kind of entry lists when opened: the link the API gave, else the path APS documents for it.
  // context: the hub and project the entry belongs to.
  function childrenUrl(entry, context) {
    var id = encodeURIComponent(entry.id);
    if (entry.type === "hubs") return related(entry, "projects") || apiPrefix + "project/v1/hubs/" + id + "/projects";
    if (entry.type === "projects") {
      var hub = context.hub && encodeURIComponent(context.hub);
      return related(entry, "topFolders") || (hub ? apiPrefix + "project/v1/hubs/" + hub + "/projects/" + id + "/topFolders" : null);
    }
    if (entry.type === "folders") {
      var project = context.project && encodeURIComponent(context.project);
      return related(entry, "contents") || (project ? apiPrefix + "data/v1/projects/" + project + "/folders/" + id + "/contents" : null);
    }
    return null;
  }

  // The hub and project that an entry's children belong to.
  function contextBelow(entry, context) {
    if (entry.type === "hubs") return { hub: entry.id, project: null };
    if (entry.type === "projects") return { hub: context.hub, project: entry.id };
    return context;
  }

  function label(entry) {
    var a = entry.attributes || {};
    return a.displayName || a.name || entry.id;
  }

  function kindName(entry) {
    return { hubs: "hub", projects: "project", folders: "folder", items: "file" }[entry.type] || entry.type;
  }

  // The viewer needs the Model Derivative URN of the file's latest version, which APS includes next to the page.
  function viewerUrn(entry, included) {
    var tip = entry.relationships && entry.relationships.tip && entry.relationships.tip.data;
    var version = tip && included.filter(function (v) { return v.id === tip.id; })[0];
    var derivative = version && version.relationships && version.relationships.derivatives;
    return derivative && derivative.data ? derivative.data.id : null;
  }

  function makeItem(entry, included, context, level, position, size) {
    var li = document.createElement("li");
    li.setAttribute("role", "treeitem");
    li.setAttribute("aria-level", String(level));
    li.setAttribute("aria-posinset", String(position));
    li.setAttribute("aria-setsize", String(size));
    li.tabIndex = -1;
    li.className = "tree-" + kindName(entry);
    var row = document.createElement("span");
    row.className = "tree-row";
    var name = document.createElement("span");
    name.className = "tree-label";
    name.id = "tree-label-" + ++labels;
    name.textContent = label(entry);
    // Named by its own label only, not by the branch it holds once opened.
    li.setAttribute("aria-labelledby", name.id);
    row.append(name);
    li.append(row);
    var url = childrenUrl(entry, context);
    if (url) {
      var below = contextBelow(entry, context);
      li.setAttribute("aria-expanded", "false");
      li.dataset.url = url;
      li.dataset.name = label(entry);
      li.dataset.hub = below.hub || "";
      li.dataset.project = below.project || "";
    } else if (entry.type === "items") {
      var urn = viewerUrn(entry, included);
      if (urn) {
        var link = document.createElement("a");
        // The project lets the viewer page ask the API for the version's name.
        link.href = viewer + "?urn=" + encodeURIComponent(urn) + (context.project ? "&project=" + encodeURIComponent(context.project) : "");
        link.textContent = "Open in viewer";
        link.tabIndex = -1; // the tree item is the one focus stop; Enter follows this link
        link.className = "tree-open";
        link.setAttribute("aria-label", "Open " + label(entry) + " in the viewer");
        row.append(" ", link);
      }
    }
    return li;
  }

  function note(text, kind) {
    var li = document.createElement("li");
    li.setAttribute("role", "none");
    li.className = "tree-note" + (kind ? " tree-" + kind : "");
    li.textContent = text;
    return li;
  }

  // Fill a group (the tree itself or an opened branch) with the entries at url.
  function load(group, url, level, name, context) {
    group.setAttribute("aria-busy", "true");
    group.replaceChildren(note("Loading…", "loading"));
    say("Loading " + name + "…");
    return getAll(url).then(
      function (list) {
        var entries = list.data.filter(function (e) { return !(e.attributes && e.attributes.hidden); });
        var items = entries.map(function (entry, i) { return makeItem(entry, list.included, context, level, i + 1, entries.length); });
        group.replaceChildren.apply(group, items.length ? items : [note("Nothing here.", "empty")]);
        group.removeAttribute("aria-busy");
        say("Loaded " + name + ": " + entries.length + (entries.length === 1 ? " entry." : " entries."), "ok");
        return true;
      },
      function (error) {
        group.removeAttribute("aria-busy");
        if (error.signedOut) {
          group.replaceChildren(note("You are signed out.", "error"));
          say("You are signed out.", "warn", { href: "/auth/login?next=" + encodeURIComponent(location.pathname), text: "Sign in again" });
          return false;
        }
        var failed = note("Could not load " + name + ": " + error.message + " ", "error");
        var retry = document.createElement("button");
        retry.type = "button";
        retry.textContent = "Try again";
        retry.addEventListener("click", function () {
          load(group, url, level, name, context).then(function (ok) {
            var first = ok && group.querySelector('[role="treeitem"]');
            if (first) focus(first);
          });
        });
        failed.append(retry);
        group.replaceChildren(failed);
        say("Could not load " + name + ". " + error.message, "warn");
        return false;
      }
    );
  }

  function isOpen(item) { return item.getAttribute("aria-expanded") === "true"; }
  function isBranch(item) { return item.hasAttribute("aria-expanded"); }

  function expand(item) {
    if (!isBranch(item) || isOpen(item)) return;
    item.setAttribute("aria-expanded", "true");
    var group = item.querySelector(':scope > ul[role="group"]');
    if (group) return;
    group = document.createElement("ul");
    group.setAttribute("role", "group");
    item.append(group);
    var context = { hub: item.dataset.hub || null, project: item.dataset.project || null };
    load(group, item.dataset.url, Number(item.getAttribute("aria-level")) + 1, item.dataset.name, context);
  }

  function collapse(item) {
    if (isOpen(item)) item.setAttribute("aria-expanded", "false");
  }

  // The tree items a person can reach now: those not inside a closed branch.
  function visible() {
    return Array.prototype.filter.call(tree.querySelectorAll('[role="treeitem"]'), function (item) {
      var parent = item.parentElement.closest('[role="treeitem"]');
      while (parent) {
        if (!isOpen(parent)) return false;
        parent = parent.parentElement.closest('[role="treeitem"]');
      }
      return true;
    });
  }

  // One tab stop for the whole tree (roving tabindex): the item last focused.
  function focus(item) {
    tree.querySelectorAll('[role="treeitem"][tabindex="0"]').forEach(function (other) { other.tabIndex = -1; });
    item.tabIndex = 0;
    item.focus();
  }

  tree.addEventListener("keydown", function (event) {
    var item = event.target.closest('[role="treeitem"]');
    if (!item || event.altKey || event.ctrlKey || event.metaKey) return;
    var items = visible();
    var at = items.indexOf(item);
    var handled = true;
    switch (event.key) {
      case "ArrowDown":
        if (at < items.length - 1) focus(items[at + 1]);
        break;
      case "ArrowUp":
        if (at > 0) focus(items[at - 1]);
        break;
      case "ArrowRight":
        if (isBranch(item) && !isOpen(item)) expand(item);
        else if (isOpen(item)) {
          var child = item.querySelector(':scope > ul > [role="treeitem"]');
          if (child) focus(child);
        }
        break;
      case "ArrowLeft":
        if (isOpen(item)) collapse(item);
        else {
          var parent = item.parentElement.closest('[role="treeitem"]');
          if (parent) focus(parent);
        }
        break;
      case "Home":
        focus(items[0]);
        break;
      case "End":
        focus(items[items.length - 1]);
        break;
      case "Enter":
      case " ":
        var open = item.querySelector(":scope > .tree-row > a.tree-open");
        if (open) open.click();
        else if (isOpen(item)) collapse(item);
        else expand(item);
        break;
      default:
        handled = false;
    }
    if (handled) event.preventDefault();
  });

  tree.addEventListener("click", function (event) {
    if (event.target.closest("a, button")) return;
    var item = event.target.closest('[role="treeitem"]');
    if (!item) return;
    focus(item);
    if (isOpen(item)) collapse(item);
    else expand(item);
  });

  if (!upstream) {
    tree.removeAttribute("aria-busy");
    tree.replaceChildren(note("This provider has no Data Management API to browse.", "empty"));
  } else {
    load(tree, apiPrefix + "project/v1/hubs", 1, "your hubs", { hub: null, project: null }).then(function (ok) {
      var first = ok && tree.querySelector('[role="treeitem"]');
      if (first) first.tabIndex = 0;
    });
  }
})();
