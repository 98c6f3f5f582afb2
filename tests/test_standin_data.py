"""The stand-in serves a small APS Data Management tree per person, checking tokens and scope as APS does."""

import base64
from urllib.parse import urlsplit

import pytest

from conftest import ISSUER, sign_in, stored_user


@pytest.fixture
def api(app, client):
    """Sign Ada in through the app; return a GET on the stand-in's API with her access token."""
    sign_in(client)
    token = stored_user(app).access_token
    provider = app.extensions["standin"].test_client()

    def get(url: str, bearer: str | None = token, query_string=None):
        parts = urlsplit(url)
        path = parts.path[len(urlsplit(ISSUER).path) :] if parts.scheme else url
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return provider.get(path, query_string=query_string or parts.query or None, headers=headers)

    return get


def walk(get, url: str) -> list[dict]:
    """Collect every entry of a list, following links.next as an APS client does."""
    entries = []
    while url:
        page = get(url)
        assert page.status_code == 200, page.get_data(as_text=True)
        entries += page.json["data"]
        url = page.json["links"].get("next", {}).get("href")
    return entries


def test_each_person_has_two_hubs_with_projects_folders_and_items(api):
    hubs = walk(api, "/project/v1/hubs")
    assert [h["attributes"]["name"] for h in hubs] == ["Ada Lovelace's personal hub", "Stand-in Construction"]
    assert [h["attributes"]["extension"]["type"] for h in hubs] == ["hubs:autodesk.core:Hub", "hubs:autodesk.bim360:Account"]
    company = hubs[1]
    projects = walk(api, company["relationships"]["projects"]["links"]["related"]["href"])
    assert [p["attributes"]["name"] for p in projects] == ["Harbour Bridge", "Riverside Clinic", "Office Fit-out"]
    top = walk(api, projects[0]["relationships"]["topFolders"]["links"]["related"]["href"])
    assert [f["attributes"]["name"] for f in top] == ["Project Files", "Plans"]
    files = walk(api, top[0]["relationships"]["contents"]["links"]["related"]["href"])
    assert [(e["type"], e.get("attributes", {}).get("displayName")) for e in files] == [
        ("folders", "Models"),
        ("items", "Site survey.pdf"),
        ("items", "Schedule.xlsx"),
    ]
    versions = walk(api, files[2]["relationships"]["versions"]["links"]["related"]["href"])
    assert [v["attributes"]["versionNumber"] for v in versions] == [3, 2, 1]
    urn = versions[0]["relationships"]["derivatives"]["data"]["id"]
    assert base64.urlsafe_b64decode(urn + "==").decode() == versions[0]["id"]


def test_lists_are_paginated_with_links_next_as_aps_does(api):
    hubs = walk(api, "/project/v1/hubs")
    projects = walk(api, hubs[0]["relationships"]["projects"]["links"]["related"]["href"])
    plans = walk(api, projects[0]["relationships"]["topFolders"]["links"]["related"]["href"])[1]
    contents = plans["relationships"]["contents"]["links"]["related"]["href"]
    first = api(contents)
    assert len(first.json["data"]) == 5 and "prev" not in first.json["links"]
    assert "page%5Bnumber%5D=1" in first.json["links"]["next"]["href"]
    assert len(first.json["included"]) == 5  # each item's tip version
    sheets = walk(api, contents)
    assert [s["attributes"]["displayName"] for s in sheets] == [f"Sheet A-{n}.dwg" for n in range(101, 113)]
    last = api(contents, query_string={"page[number]": "2", "page[limit]": "5"})
    assert len(last.json["data"]) == 2 and "next" not in last.json["links"] and "prev" in last.json["links"]
    assert api(contents, query_string={"page[limit]": "201"}).status_code == 400
    assert api(contents, query_string={"page[number]": "x"}).status_code == 400


def test_the_tree_is_the_same_at_every_sign_in_and_different_per_person(app, api):
    ada = walk(api, "/project/v1/hubs")
    assert walk(api, "/project/v1/hubs") == ada
    other = app.test_client()
    sign_in(other, "Grace Hopper")
    grace_token = stored_user(app, "Grace Hopper").access_token
    grace = api("/project/v1/hubs", bearer=grace_token).json["data"]
    assert {h["id"] for h in grace}.isdisjoint({h["id"] for h in ada})
    # Ada's hub is not Grace's: APS answers 404, not the projects.
    assert api(f"/project/v1/hubs/{ada[0]['id']}/projects", bearer=grace_token).status_code == 404


def test_a_missing_or_unknown_token_is_401_and_a_token_without_data_read_is_403(app, api):
    assert api("/project/v1/hubs", bearer=None).status_code == 401
    unknown = api("/project/v1/hubs", bearer="not-a-token")
    assert unknown.status_code == 401 and unknown.json["errorCode"] == "AUTH-001"
    viewer = stored_user(app).viewer_token  # narrowed to viewables:read at sign-in
    narrow = api("/project/v1/hubs", bearer=viewer)
    assert narrow.status_code == 403 and narrow.json["errorCode"] == "AUTH-010"
