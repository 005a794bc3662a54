"""`python -m stages.plots_page`: write the page template that `dvc plots show` and `dvc plots
diff` fill (.dvc/config: `plots.html_template`), with Vega, Vega-Lite and Vega-Embed inlined
from vl-convert-python's bundle instead of loaded from a CDN, so the page renders offline.

The template is committed; run this again after changing the Vega-Lite version (a test checks
that the committed file is what this command writes with the installed vl-convert-python)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, help=__doc__)

PAGE = Path(".dvc") / "plots" / "page.html"
# DVC's templates declare Vega-Lite v5; the newest 5.x that vl-convert bundles.
VEGA_LITE = "5.21"


def page_html(vl_version: str = VEGA_LITE) -> str:
    """The template: DVC's {refresh_tag} and {plot_divs} placeholders, no {scripts} (DVC's
    CDN script tags), the bundle in one classic script. Each plot div calls `vegaEmbed` as the
    page is parsed, so the bundle must run first and must not be a deferred module; it is
    wrapped in a function so that its top-level names cannot clash with DVC's `var spec`."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=f"v{vl_version}")
    if "</script" in bundle or "{plot_divs}" in bundle:
        raise ValueError("the Vega bundle cannot be inlined: it contains '</script' or "
                         "DVC's placeholder")
    versions = (f"Vega {vl_convert.get_vega_version()}, Vega-Lite {vl_version}, Vega-Embed "
                f"{vl_convert.get_vega_embed_version()}")
    return ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n"
            "    <meta charset=\"utf-8\">\n    <title>DVC Plot</title>\n"
            f"    <!-- {versions}, inlined by `python -m stages.plots_page` -->\n"
            "    <script type=\"text/javascript\">\n(function () {\n" + bundle +
            "\n})();\n    </script>\n"
            "    <style>\n        table {\n            border-spacing: 15px;\n        }\n"
            "    </style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n")


@app.command()
def plots_page(out: Annotated[Path, typer.Option(help="where to write the template")] = PAGE
               ) -> None:
    """Write the offline page template."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page_html(), encoding="utf-8")
    typer.echo(f"plots_page: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
