"""The stand-in's APS Data Management API: a small, fixed tree of hubs, projects, folders and items per person.

Every person who signs in owns the same shape of tree, with ids derived from their subject, so the
demo and the tests browse something real offline. It answers as APS does where a client can tell:
JSON:API documents, `data:read` required (401 for a missing or unknown token, 403 without the
scope), lists paginated with `page[number]` and `page[limit]` and `links.next` while more remain,
and 404 for anything that is not the caller's. Faults can be injected (store.inject with the
api_* kinds): a 503, a slow answer, an oversized one, a 401 to any token.
"""

import base64
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from flask import Blueprint, Response, current_app, jsonify, request

from standin.inprocess import slow_down
from standin.store import API_FAULTS, Store, digest

REQUIRED_SCOPE = "data:read"
# APS's largest page; the stand-in's default page is smaller so that a demo folder needs two.
MAX_PAGE_LIMIT = 200
DEFAULT_PAGE_LIMIT = 5
# 1 January 2025, so every person's tree carries the same dates.
EPOCH = 1735689600


@dataclass
class Node:
    """A hub, project, folder or item of the tree, with its children in order."""

    kind: str
    id: str
    name: str
    children: list["Node"] = field(default_factory=list)
    versions: int = 0
    file_type: str = ""


def tree(sub: str, name: str) -> list[Node]:
    """Return the person's hubs, each holding its projects, their top folders, folders and items."""

    def make_id(prefix: str, *parts: str) -> str:
        return prefix + digest(":".join((sub, *parts)))[:20]

    def item(project: str, filename: str, versions: int) -> Node:
        return Node("items", make_id("urn:adsk.wipprod:dm.lineage:", project, filename), filename, versions=versions, file_type=filename.rsplit(".", 1)[-1])

    def folder(project: str, title: str, children: list[Node]) -> Node:
        return Node("folders", make_id("urn:adsk.wipprod:fs.folder:co.", project, title), title, children)

    def project(hub: str, title: str) -> Node:
        key = f"{hub}/{title}"
        models = folder(key, "Models", [item(key, f"{title} {part}.rvt", 2) for part in ("Architecture", "Structure", "MEP")])
        files = folder(key, "Project Files", [models, item(key, "Site survey.pdf", 1), item(key, "Schedule.xlsx", 3)])
        # Twelve sheets: more than one page at the stand-in's default page size.
        plans = folder(key, "Plans", [item(key, f"Sheet A-{n:03d}.dwg", 1 + n % 2) for n in range(101, 113)])
        return Node("projects", make_id("b.", key), title, [files, plans])

    personal = Node("hubs", make_id("a.", "personal"), f"{name}'s personal hub", [project("personal", "Sample Project")])
    company_projects = [project("company", title) for title in ("Harbour Bridge", "Riverside Clinic", "Office Fit-out")]
    company = Node("hubs", make_id("b.", "company"), "Stand-in Construction", company_projects)
    return [personal, company]


bp = Blueprint("data", __name__)


class Refused(Exception):
    """An answer other than the document asked for: a bad token, or an injected fault."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer


@bp.errorhandler(Refused)
def refused(exc: Refused):
    return exc.answer


def caller() -> list[Node]:
    """Return the token's owner's tree; raise Refused with the answer APS gives to a missing, unknown or too narrow token."""
    store: Store = current_app.extensions["standin_store"]
    header = request.headers.get("Authorization", "")
    access = store.access_token(header[7:]) if header.startswith("Bearer ") else None
    with store.transaction() as conn:
        store.record(conn, "api", access["sub"] if access else "")  # tests count the calls that reached the API
    if access is None:
        body = {"developerMessage": "The required auth token is missing or invalid.", "errorCode": "AUTH-001"}
        raise Refused((jsonify(body), 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}))
    if REQUIRED_SCOPE not in access["scope"].split():
        body = {"developerMessage": "Token does not have the privilege for this request.", "errorCode": "AUTH-010"}
        raise Refused((jsonify(body), 403))
    _take_fault(store)
    person = store.person(access["sub"])
    return tree(access["sub"], person["name"] if person else "Someone")


def _take_fault(store: Store) -> None:
    """Act out an injected API fault, if one is due."""
    fault = store.take_fault(API_FAULTS)
    if fault and fault["kind"] == "api_5xx":
        raise Refused((jsonify(errors=[_error(503, "SERVICE_UNAVAILABLE", "injected fault")]), 503))
    if fault and fault["kind"] == "api_401":
        # Some APIs answer 401 for a resource the token may not see, however fresh the token.
        body = {"developerMessage": "The required auth token is missing or invalid.", "errorCode": "AUTH-001"}
        raise Refused((jsonify(body), 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}))
    if fault and fault["kind"] == "api_slow":
        slow_down(fault["delay"])
    if fault and fault["kind"] == "api_large":
        # A document far larger than any listing: "delay" carries its size in mebibytes.
        padding = "x" * int(max(fault["delay"], 0.1) * 1024 * 1024)
        raise Refused((jsonify(jsonapi={"version": "1.0"}, data=[], meta={"padding": padding}), 200))


def find(nodes: list[Node], kind: str, node_id: str) -> Node | None:
    return next((n for n in nodes if n.kind == kind and n.id == node_id), None)


def project_of(hubs: list[Node], project_id: str) -> Node | None:
    return next((p for hub in hubs for p in hub.children if p.id == project_id), None)


def inside(project: Node, kind: str, node_id: str) -> Node | None:
    """Find a folder or item anywhere in the project's folders."""
    stack = list(project.children)
    while stack:
        node = stack.pop()
        if node.kind == kind and node.id == node_id:
            return node
        if node.kind == "folders":
            stack.extend(node.children)
    return None


def url(*segments: str) -> str:
    return current_app.config["STANDIN"]["issuer"] + "/" + "/".join(quote(s, safe=":") for s in segments)


@bp.get("/project/v1/hubs")
def hubs():
    return _page(caller(), lambda hub: _hub(hub, url), url("project", "v1", "hubs"))


@bp.get("/project/v1/hubs/<hub_id>/projects")
def projects(hub_id: str):
    hub = find(caller(), "hubs", hub_id)
    if hub is None:
        return _not_found("hub")
    return _page(hub.children, lambda p: _project(hub, p, url), url("project", "v1", "hubs", hub_id, "projects"))


@bp.get("/project/v1/hubs/<hub_id>/projects/<project_id>/topFolders")
def top_folders(hub_id: str, project_id: str):
    hub = find(caller(), "hubs", hub_id)
    project = find(hub.children, "projects", project_id) if hub else None
    if project is None:
        return _not_found("project")
    return _page(project.children, lambda f: _folder(project, f, url), url("project", "v1", "hubs", hub_id, "projects", project_id, "topFolders"))


@bp.get("/data/v1/projects/<project_id>/folders/<folder_id>/contents")
def folder_contents(project_id: str, folder_id: str):
    project = project_of(caller(), project_id)
    folder = inside(project, "folders", folder_id) if project else None
    if folder is None:
        return _not_found("folder")

    def describe(node: Node) -> dict:
        return _folder(project, node, url) if node.kind == "folders" else _item(project, node, url)

    def tips(nodes: list[Node]) -> list[dict]:
        # APS includes each item's latest version next to the page.
        return [_version(project, n, n.versions, url) for n in nodes if n.kind == "items"]

    return _page(folder.children, describe, url("data", "v1", "projects", project_id, "folders", folder_id, "contents"), included=tips)


@bp.get("/data/v1/projects/<project_id>/items/<item_id>/versions")
def item_versions(project_id: str, item_id: str):
    project = project_of(caller(), project_id)
    item = inside(project, "items", item_id) if project else None
    if item is None:
        return _not_found("item")
    numbers = list(range(item.versions, 0, -1))  # newest first, as APS lists them
    return _page(numbers, lambda n: _version(project, item, n, url), url("data", "v1", "projects", project_id, "items", item_id, "versions"))


def _page(nodes: list, describe, self_url: str, included=None) -> Response:
    """Answer one page of a list, with APS's links: next while more remain, prev after the first."""
    try:
        number = int(request.args.get("page[number]", "0"))
        limit = int(request.args.get("page[limit]", str(DEFAULT_PAGE_LIMIT)))
    except ValueError:
        return jsonify(jsonapi={"version": "1.0"}, errors=[_error(400, "BAD_INPUT", "page[number] and page[limit] must be whole numbers")]), 400
    if number < 0 or not 1 <= limit <= MAX_PAGE_LIMIT:
        return jsonify(jsonapi={"version": "1.0"}, errors=[_error(400, "BAD_INPUT", f"page[limit] must be 1 to {MAX_PAGE_LIMIT}")]), 400
    chunk = nodes[number * limit : (number + 1) * limit]
    links: dict = {"self": {"href": _with_page(self_url, number, limit)}}
    if len(nodes) > limit:
        links["first"] = {"href": _with_page(self_url, 0, limit)}
        if number > 0:
            links["prev"] = {"href": _with_page(self_url, number - 1, limit)}
        if (number + 1) * limit < len(nodes):
            links["next"] = {"href": _with_page(self_url, number + 1, limit)}
    body = {"jsonapi": {"version": "1.0"}, "links": links, "data": [describe(n) for n in chunk]}
    if included is not None:
        body["included"] = included(chunk)
    return jsonify(body)


def _with_page(url: str, number: int, limit: int) -> str:
    return f"{url}?page%5Bnumber%5D={number}&page%5Blimit%5D={limit}"


def _created(node_id: str) -> str:
    seconds = EPOCH + int(digest(node_id)[:6], 16) % (300 * 86400)
    return time.strftime("%Y-%m-%dT%H:%M:%S.0000000Z", time.gmtime(seconds))


def _hub(hub: Node, url) -> dict:
    kind = "hubs:autodesk.core:Hub" if hub.id.startswith("a.") else "hubs:autodesk.bim360:Account"
    return {
        "type": "hubs",
        "id": hub.id,
        "attributes": {"name": hub.name, "region": "US", "extension": {"type": kind, "version": "1.0", "data": {}}},
        "links": {"self": {"href": url("project", "v1", "hubs", hub.id)}},
        "relationships": {"projects": {"links": {"related": {"href": url("project", "v1", "hubs", hub.id, "projects")}}}},
    }


def _project(hub: Node, project: Node, url) -> dict:
    kind = "projects:autodesk.core:Project" if hub.id.startswith("a.") else "projects:autodesk.bim360:Project"
    return {
        "type": "projects",
        "id": project.id,
        "attributes": {"name": project.name, "scopes": ["global"], "extension": {"type": kind, "version": "1.0", "data": {}}},
        "links": {"self": {"href": url("project", "v1", "hubs", hub.id, "projects", project.id)}},
        "relationships": {
            "hub": {"data": {"type": "hubs", "id": hub.id}, "links": {"related": {"href": url("project", "v1", "hubs", hub.id)}}},
            "topFolders": {"links": {"related": {"href": url("project", "v1", "hubs", hub.id, "projects", project.id, "topFolders")}}},
        },
    }


def _folder(project: Node, folder: Node, url) -> dict:
    return {
        "type": "folders",
        "id": folder.id,
        "attributes": {
            "name": folder.name,
            "displayName": folder.name,
            "objectCount": len(folder.children),
            "createTime": _created(folder.id),
            "hidden": False,
            "extension": {"type": "folders:autodesk.bim360:Folder", "version": "1.0", "data": {}},
        },
        "links": {"self": {"href": url("data", "v1", "projects", project.id, "folders", folder.id)}},
        "relationships": {"contents": {"links": {"related": {"href": url("data", "v1", "projects", project.id, "folders", folder.id, "contents")}}}},
    }


def _item(project: Node, item: Node, url) -> dict:
    return {
        "type": "items",
        "id": item.id,
        "attributes": {
            "displayName": item.name,
            "createTime": _created(item.id),
            "hidden": False,
            "extension": {"type": "items:autodesk.bim360:File", "version": "1.0", "data": {}},
        },
        "links": {"self": {"href": url("data", "v1", "projects", project.id, "items", item.id)}},
        "relationships": {
            "tip": {"data": {"type": "versions", "id": _version_id(item, item.versions)}},
            "versions": {"links": {"related": {"href": url("data", "v1", "projects", project.id, "items", item.id, "versions")}}},
        },
    }


def _version_id(item: Node, number: int) -> str:
    return item.id.replace("dm.lineage:", "fs.file:vf.") + f"?version={number}"


def _version(project: Node, item: Node, number: int, url) -> dict:
    version_id = _version_id(item, number)
    # The Model Derivative URN of a version is its id, base64url-encoded without padding.
    urn = base64.urlsafe_b64encode(version_id.encode()).rstrip(b"=").decode()
    return {
        "type": "versions",
        "id": version_id,
        "attributes": {
            "name": item.name,
            "displayName": item.name,
            "versionNumber": number,
            "createTime": _created(f"{version_id}"),
            "fileType": item.file_type,
            "extension": {"type": "versions:autodesk.bim360:File", "version": "1.0", "data": {}},
        },
        "links": {"self": {"href": url("data", "v1", "projects", project.id, "versions", version_id)}},
        "relationships": {
            "item": {"data": {"type": "items", "id": item.id}},
            "derivatives": {"data": {"type": "derivatives", "id": urn}},
        },
    }


def _error(status: int, code: str, detail: str) -> Mapping:
    return {"status": str(status), "code": code, "title": detail, "detail": detail}


def _not_found(what: str) -> tuple[Response, int]:
    return jsonify(jsonapi={"version": "1.0"}, errors=[_error(404, "NOT_FOUND", f"The {what} does not exist or you have no access to it.")]), 404
