"""`dvc plots show` without network: DVC's HTML page loads Vega from a CDN, so offline it draws
nothing. This writes a page template with Vega, Vega-Lite and Vega-Embed inlined (the bundle that
vl-convert-python carries) for `dvc plots show --html-template`."""
from __future__ import annotations

from pathlib import Path

from transferlab.files import atomic_writer

# DVC fills {plot_divs} (and {refresh_tag}); without its {scripts} placeholder, no CDN tags are added.
_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script>
BUNDLE
    </script>
    <style>
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
# DVC's plot specs are Vega-Lite 5.
VEGA_LITE = "5.20"


def offline_template(folder: str | Path) -> Path:
    """The template file in `folder`, written on first use (the bundle is about 0.9 MB)."""
    import vl_convert

    path = Path(folder) / f"dvc-plots-offline-vl{VEGA_LITE}-vlc{vl_convert.__version__}.html"
    if not path.exists():
        bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
        if "</script" in bundle.lower():  # would end the inline <script> early
            bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
        with atomic_writer(path, encoding="utf-8") as f:
            f.write(_PAGE.replace("BUNDLE", bundle))
    return path
