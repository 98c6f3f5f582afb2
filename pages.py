"""What a person sees."""

from flask import Blueprint, g, render_template

bp = Blueprint("pages", __name__)


@bp.get("/")
def home():
    return render_template("home.html", user=g.get("user"))
