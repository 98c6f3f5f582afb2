"""Forward the browser's GET /api/aps/<path> to the provider's API host, with the person's access token attached.

Only allow-listed paths leave this server, and only an answer that arrives whole, in time and within
bounds comes back (upstream.py says which paths, and how an answer is read).
"""

from flask import Blueprint, Response, abort, g, jsonify, request

import bearer
import metrics
import upstream

bp = Blueprint("proxy", __name__)
bp.after_request(metrics.count_proxy_response)  # every answer, the error pages and refusals too


@bp.get(f"{upstream.PREFIX}<path:path>")
def forward(path: str) -> Response:
    """Answer with the API host's answer to the same GET, if its path is on the allow-list."""
    base = upstream.api_base()
    target = upstream.allowed_target()
    if base is None or target is None:
        abort(404, "This API path is not forwarded.")
    if g.user is None:
        abort(401)
    url = f"{base}/{target}"
    try:
        answer = bearer.call_with_access_token(g.account(), lambda token: upstream.fetch(url, token), trigger=f"GET {request.path}")
    except upstream.UpstreamFailed as exc:
        return jsonify(error=exc.error, message=exc.message), exc.status
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    response.headers.update(answer.headers)
    return response
