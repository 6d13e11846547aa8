"""Headless Chromium for the docs site: the browser the tests drive, and the screenshots of the README and the guide.

    python -m clt.site.screenshots [--out docs/img]     # overview.png, clt_graph.png, feature.png, ... of docs/

and, at each of `--widths` (800 and 1600 pixels by default), overview_<width>.png and decision_<width>.png.

Uses Selenium with the system's Chromium and ChromeDriver (Debian: `apt-get install chromium
chromium-driver`); nothing is downloaded. The site is served by clt.site.server on a free port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from clt.site.server import DOCS_DIR, serve
from policy.cli import command

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
# Flags for a machine with no display and no network: no sandbox (root in containers), no background traffic.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic")  # fmt: skip


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths from $CHROMIUM / $CHROMEDRIVER or the PATH; None when either is missing."""
    browser = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM)), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A headless Chromium WebDriver that records the console (driver.get_log('browser')); quit on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:
        raise ValueError("the browser needs selenium: pip install -e '.[docs]'") from err
    found = find_browser()
    if found is None:
        raise FileNotFoundError("no chromium + chromedriver found; on Debian: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def rendered(driver, url: str) -> None:
    """Open `url` and wait until the page has drawn its content (the site's data scripts take a moment to parse)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script("return document.getElementById('content').children.length > 0")
    )


def column_node(driver, column: int):
    """The first feature of a graph column (clamped to the last column) on the CLT or SAE tab on screen."""
    nodes = driver.find_elements("css selector", "#graph circle.node")
    columns = list(dict.fromkeys(n.get_attribute("data-dict") for n in nodes))
    wanted = columns[min(column, len(columns) - 1)]
    return next(n for n in nodes if n.get_attribute("data-dict") == wanted)


def open_feature(driver, column: int = 0) -> tuple[str, int]:
    """Click the first feature of a graph column; returns its (dictionary, index)."""
    node = column_node(driver, column)
    found = node.get_attribute("data-dict"), int(node.get_attribute("data-index"))
    node.click()
    return found


def hover_feature(driver, column: int = 0) -> None:
    """Move the mouse onto the first feature of a graph column."""
    from selenium.webdriver import ActionChains

    ActionChains(driver).move_to_element(column_node(driver, column)).perform()


def take_screenshots(docs_dir: str | Path, out: str | Path, widths: tuple[int, ...] = ()) -> list[Path]:
    """overview.png, clt_graph.png, feature.png and features.png (the Features tab, searching "spot") of the site in
    docs_dir, and decision.png (the first decision, its strongest feature hovered) when the site has decisions;
    then at_width's pair at each of `widths`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with serve(docs_dir) as url, chromium(height=1250) as driver:
        for name, hash_ in (("overview", "#/overview"), ("clt_graph", "#/clt"), ("feature", None)):
            if hash_ is None:  # a feature of the second column: it has up- and downstream features
                open_feature(driver, column=1)
            else:
                rendered(driver, url + hash_)
            if name == "clt_graph":  # each pair of columns on its own scale; a hovered middle feature's edges stand out
                driver.find_element("id", "per-pair").click()
                hover_feature(driver, column=1)
            path = out / f"{name}.png"
            driver.find_element("tag name", "body").screenshot(str(path))
            shots.append(path)
        rendered(driver, url + "#/features")
        driver.find_element("id", "feature-search").send_keys("spot")
        shots.append(out / "features.png")
        driver.find_element("tag name", "body").screenshot(str(shots[-1]))
        decisions = driver.execute_script("return window.DECISIONS || []")
        if decisions:
            from selenium.webdriver import ActionChains

            first = decisions[0]
            rendered(driver, url + "#/decision/" + first["name"])
            node = driver.find_element("css selector", f"#graph .node[data-id='{first['top_features'][0]['id']}']")
            ActionChains(driver).move_to_element(node).perform()
            shots.append(out / "decision.png")
            driver.find_element("tag name", "body").screenshot(str(shots[-1]))
    for width in widths:
        shots += at_width(docs_dir, out, width)
    return shots


def at_width(docs_dir: str | Path, out: Path, width: int) -> list[Path]:
    """overview_<width>.png and (when the site has decisions) decision_<width>.png, in a window `width` pixels
    wide."""
    shots = []
    with serve(docs_dir) as url, chromium(width=width, height=1250) as driver:
        pages = [("overview", "#/overview")]
        rendered(driver, url + "#/overview")
        decisions = driver.execute_script("return window.DECISIONS || []")
        if decisions:
            pages.append(("decision", "#/decision/" + decisions[0]["name"]))
        for name, hash_ in pages:
            rendered(driver, url + hash_)
            shots.append(out / f"{name}_{width}.png")
            driver.find_element("tag name", "body").screenshot(str(shots[-1]))
    return shots


@click.command(context_settings={"show_default": True})
@click.option("--docs_dir", default=str(DOCS_DIR), help="The site folder (with data/site.js from clt.site.export).")
@click.option("--out", default=str(DOCS_DIR / "img"), help="Where to write the PNGs.")
@click.option("--widths", default="800,1600", help="Also the overview and a decision at these window widths "
              "(comma-separated pixels; empty: none).")  # fmt: skip
def main(docs_dir, out, widths):
    """Screenshot the overview, the CLT graph, a feature page and a decision in headless Chromium."""
    with command():
        try:
            sizes = tuple(int(w) for w in widths.split(",") if w.strip())
        except ValueError:
            raise ValueError(f"--widths takes comma-separated pixel widths, got {widths!r}") from None
        if any(w < 200 for w in sizes):
            raise ValueError(f"--widths must be at least 200 pixels each, got {widths!r}")
        shots = take_screenshots(docs_dir, out, sizes)
    click.echo("\n".join(str(p) for p in shots))


if __name__ == "__main__":
    main()
