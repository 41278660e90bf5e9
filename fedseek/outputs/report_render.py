"""report.html from the view model: the Jinja2 template `outputs/templates/report.html.j2`, autoescaped."""

from __future__ import annotations

from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined

from fedseek.outputs.report_view import ReportView

TEMPLATE = "report.html.j2"


@cache
def environment() -> Environment:
    """The template environment: package templates, autoescape on, undefined names an error."""
    return Environment(loader=PackageLoader("fedseek", "outputs/templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(view: ReportView) -> str:
    """The page as HTML text; every value from the run is escaped by the template engine."""
    return environment().get_template(TEMPLATE).render(view=view)
