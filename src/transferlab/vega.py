"""Plain `dvc plots show` and `dvc plots diff`, drawn without network.

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it draws nothing. The
project's `.dvc/config` names a page template of its own (`plots.html_template`, a path relative
to `.dvc/`) with the three inlined (the bundle that vl-convert-python carries) and no `{scripts}`
placeholder, where DVC would add the CDN tags. The file is derived, so not in git: `make install`
and every run of the plot stage write it when it is missing or from another bundle.
"""
from __future__ import annotations

from pathlib import Path

from transferlab.files import atomic_writer

TEMPLATE = "offline-plots.html"  # in .dvc/, as .dvc/config names it
VEGA_LITE = "5.20"  # DVC's plot specs are Vega-Lite 5

# DVC fills {plot_divs} and {refresh_tag}; with no {scripts} placeholder, it adds no CDN tags.
_PAGE = """<!DOCTYPE html>
<!-- STAMP -->
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


def write_offline_template(dvc_dir: str | Path = ".dvc") -> Path:
    """The template in `dvc_dir`, written unless it is there already from this bundle (~0.9 MB)."""
    import vl_convert

    path = Path(dvc_dir) / TEMPLATE
    stamp = f"transferlab offline plots: Vega-Lite {VEGA_LITE}, vl-convert-python {vl_convert.__version__}"
    if path.exists() and stamp in path.read_text(encoding="utf-8")[:300]:
        return path
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    if "</script" in bundle.lower():  # would end the inline <script> early
        bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    with atomic_writer(path, encoding="utf-8") as f:
        f.write(_PAGE.replace("STAMP", stamp).replace("BUNDLE", bundle))
    return path


if __name__ == "__main__":  # `make install` runs this in the project's root
    print(f"wrote {write_offline_template()}: dvc plots show and dvc plots diff draw without network")
