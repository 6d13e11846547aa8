"""The docs site in a real browser: headless Chromium driven by Selenium (system chromium + chromedriver).

Skipped where no browser is installed, unless REQUIRE_BROWSER=1 (CI sets it): then a missing browser fails.
"""

import json
import os
from urllib.parse import quote

import pytest

from clt.site.screenshots import chromium, find_browser, open_feature
from clt.site.server import DOCS_DIR, SITE_FILES, serve

if find_browser() is None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        raise RuntimeError("REQUIRE_BROWSER=1 but no chromium + chromedriver: apt-get install chromium chromium-driver")
    pytest.skip("no chromium + chromedriver (apt-get install chromium chromium-driver)", allow_module_level=True)

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def site(site_dir):
    data = json.loads((site_dir / "data" / "site.json").read_text())
    with serve(site_dir) as url:
        yield url, data


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def heading(driver) -> str:
    """The page's h2, read in one script call (the page may be re-rendering between two WebDriver calls)."""
    return driver.execute_script("return document.querySelector('h2')?.textContent || ''")


def open_page(driver, url: str, wait_for: str):
    driver.get(url)
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, wait_for))


def test_every_tab_loads_without_console_errors(browser, site):
    url, _ = site
    for hash_, wait_for in (("#/overview", "table"), ("#/sae", "#graph"), ("#/clt", "#graph"),
                            ("#/clt/multilayer", "#graph"), ("#/decisions", "table")):  # fmt: skip
        open_page(browser, url + hash_, wait_for)
        assert console_errors(browser) == [], hash_
    open_page(browser, url + "#/overview", "table")
    text = browser.find_element(By.ID, "content").text
    assert "clt_L0.mlp_in_to_L0.mlp_out" in text and "ridge FVU" in text and "recovered" in text
    assert "Generalisation of clt_L0.mlp_in_to_L0.mlp_out: FVU" in text and "tiny@1 clustered n10" in text


@pytest.mark.parametrize("view", ["mlp", "multilayer", "sae"])
def test_graph_shows_one_node_per_exported_feature(browser, site, view):
    url, data = site
    (spec,) = [v for v in data["views"] if v["id"] == view]
    open_page(browser, url + ("#/sae" if view == "sae" else f"#/clt/{view}"), "#graph circle.node")
    expected = sum(len(data["dictionaries"][d]["feature_pages"]) for d in spec["dictionaries"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph circle.node")) == expected
    drawn = browser.find_elements(By.CSS_SELECTOR, "#graph path.edge")
    assert len(drawn) == len(spec["edges"])
    assert console_errors(browser) == []


def test_threshold_slider_hides_weak_edges(browser, site):
    url, data = site
    open_page(browser, url + "#/clt/mlp", "#graph path.edge")
    total = len(data["views"][1]["edges"])
    browser.execute_script(
        "const s = document.getElementById('threshold'); s.value = 100; s.dispatchEvent(new Event('input'));"
    )
    visible = [e for e in browser.find_elements(By.CSS_SELECTOR, "#graph path.edge") if e.is_displayed()]
    assert 1 <= len(visible) < total
    assert browser.find_element(By.ID, "edge-count").text == f"{len(visible)} of {total} edges"
    browser.find_element(By.ID, "per-pair").click()  # at 100%: the strongest edge of every pair of columns
    visible = [e for e in browser.find_elements(By.CSS_SELECTOR, "#graph path.edge") if e.is_displayed()]
    pairs = {(e[0], e[2]) for e in data["views"][1]["edges"]}
    assert len(visible) == len(pairs) == 1  # the tiny run's mlp graph: layer 0 -> layer 1


def test_clicking_a_node_opens_its_feature_page_with_one_map_per_top_instance(browser, site, tmp_path):
    url, data = site
    open_page(browser, url + "#/clt/mlp", "#graph circle.node")
    dict_id, index = open_feature(browser, column=0)
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.tsp-map"))
    assert "#/feature/" in browser.current_url and f"feature #{index}" in heading(browser)
    (page,) = [p for p in data["dictionaries"][dict_id]["feature_pages"] if p["index"] == index]
    maps = browser.find_elements(By.CSS_SELECTOR, "svg.tsp-map")
    assert len(maps) == len(page["top_instances"]) == 3
    assert len(maps[0].find_elements(By.CSS_SELECTOR, "circle, rect")) == 10  # one mark per city
    assert browser.find_elements(By.CSS_SELECTOR, "svg.histogram rect")
    links = browser.find_elements(By.PARTIAL_LINK_TEXT, "L1.mlp_in_to_L1.mlp_out #")
    assert links, "downstream features link to their pages"
    links[0].click()
    WebDriverWait(browser, 10).until(lambda d: "L1.mlp_in_to_L1.mlp_out feature" in heading(d))
    assert console_errors(browser) == []
    shot = tmp_path / "feature.png"
    assert browser.find_element(By.TAG_NAME, "body").screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dictionaries_reading_the_same_point_share_a_column(browser, site_dir, tmp_path):
    data = json.loads((site_dir / "data" / "site.json").read_text())
    moves = (({}, 2), ({"clt/clt_L1.mlp_in_to_L1.mlp_out": 1}, 1))  # as exported; then L1 put in L0's column
    for n, (positions, expected_columns) in enumerate(moves):
        for dict_id, at in positions.items():
            data["dictionaries"][dict_id]["position"] = at
        folder = tmp_path / str(n)
        (folder / "data").mkdir(parents=True)
        for name in SITE_FILES:
            (folder / name).write_bytes((site_dir / name).read_bytes())
        (folder / "data" / "site.js").write_text(f"window.SITE_DATA = {json.dumps(data)};")
        (folder / "data" / "decisions.js").write_bytes((site_dir / "data" / "decisions.js").read_bytes())
        open_page(browser, (folder / "index.html").as_uri() + "#/clt/mlp", "#graph circle.node")
        places = [
            (c.get_attribute("cx"), c.get_attribute("cy"))
            for c in browser.find_elements(By.CSS_SELECTOR, "#graph circle.node")
        ]
        assert len({x for x, _ in places}) == expected_columns
        assert len(set(places)) == len(places)  # stacked, not on top of each other
    assert console_errors(browser) == []


def test_the_site_opens_from_the_file_system(browser, site_dir):
    open_page(browser, (site_dir / "index.html").as_uri() + "#/clt", "#graph circle.node")
    assert console_errors(browser) == []


def test_a_site_without_data_says_how_to_export(browser, site_dir, tmp_path):
    for name in SITE_FILES:
        (tmp_path / name).write_bytes((site_dir / name).read_bytes())
    browser.get((tmp_path / "index.html").as_uri())
    assert "python -m clt.site.export" in browser.find_element(By.CLASS_NAME, "empty").text
    errors = console_errors(browser)  # read, so that they do not leak into the next test
    assert errors and all("site.js" in e or "decisions.js" in e for e in errors)


def test_a_decision_page_draws_its_graph_and_its_nodes_open_feature_pages(browser, site, site_dir):
    url, _ = site
    decisions = json.loads((site_dir / "data" / "decisions.json").read_text())
    open_page(browser, url + "#/decisions", "table")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#content table tr")) == len(decisions) + 1
    d = decisions[1]
    browser.find_element(By.LINK_TEXT, d["name"]).click()
    WebDriverWait(browser, 10).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#graph .node"))
    assert f"step {d['step']}" in heading(browser)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph .node")) == len(d["nodes"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph path.edge")) == len(d["edges"])
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.decision-map .city")) == len(d["instance"]["locs"])
    # clicking a city on the map dims every node of the other cities
    city = d["targets"][0]
    browser.find_element(By.CSS_SELECTOR, f"svg.decision-map .city[data-city='{city}']").click()
    lit = [n for n in browser.find_elements(By.CSS_SELECTOR, "#graph .node") if "dim" not in n.get_attribute("class")]
    assert lit and all(n.get_attribute("data-city") == str(city) for n in lit)
    # a stricter node threshold shows fewer nodes
    before = browser.find_element(By.ID, "decision-count").text
    browser.execute_script("const s = document.getElementById('node-threshold'); s.value = 20;"
                           "s.dispatchEvent(new Event('input'));")  # fmt: skip
    shown = [n for n in browser.find_elements(By.CSS_SELECTOR, "#graph .node") if n.is_displayed()]
    assert len(shown) < len(d["nodes"]) and browser.find_element(By.ID, "decision-count").text != before
    browser.execute_script("const s = document.getElementById('node-threshold'); s.value = s.max;"
                           "s.dispatchEvent(new Event('input'));")  # fmt: skip
    # clicking the most influential feature drawn opens its feature page
    drawn = {n["id"] for n in d["nodes"]}
    top = next(f["id"] for f in d["top_features"] if f["id"] in drawn)
    _, layer, _, feature = top.split(":")
    node = browser.find_element(By.CSS_SELECTOR, f"#graph .node[data-id='{top}']")
    browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", node)
    WebDriverWait(browser, 10).until(lambda b: "#/feature/" in b.current_url)
    WebDriverWait(browser, 10).until(lambda b: f"feature #{feature}" in heading(b))
    assert f"CLT L{layer}" in heading(browser) and browser.find_elements(By.CSS_SELECTOR, "svg.tsp-map")
    assert console_errors(browser) == []


def test_the_committed_demo_site_loads(browser):
    """docs/ as committed (the export of runs/tsp20_demo): app.js and the data agree."""

    data = json.loads((DOCS_DIR / "data" / "site.json").read_text())
    with serve(DOCS_DIR) as url:
        open_page(browser, url + "#/overview", "table")
        assert "tsp20_demo" in browser.find_element(By.ID, "run-name").text
        for view in data["views"]:
            open_page(browser, url + ("#/sae" if view["id"] == "sae" else f"#/clt/{view['id']}"), "#graph circle.node")
            expected = sum(len(data["dictionaries"][d]["feature_pages"]) for d in view["dictionaries"])
            assert len(browser.find_elements(By.CSS_SELECTOR, "#graph circle.node")) == expected
        open_feature(browser, column=1)
        WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.tsp-map"))
        assert console_errors(browser) == []


def test_the_screenshots_include_a_decision(site_dir, tmp_path):
    from clt.site.screenshots import take_screenshots

    shots = take_screenshots(site_dir, tmp_path, widths=(800,))
    assert [p.name for p in shots] == ["overview.png", "clt_graph.png", "feature.png", "features.png", "decision.png",
                                       "overview_800.png", "decision_800.png"]  # fmt: skip
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in shots)


def test_at_800_pixels_nothing_runs_off_the_side(site, site_dir):
    """A window 800 px wide: the page itself never scrolls sideways (wide tables and graphs scroll inside their own
    box), and the decision page stacks the map above the graph, with the details below, all on screen."""
    url, _ = site
    decisions = json.loads((site_dir / "data" / "decisions.json").read_text())
    with chromium(width=800, height=1000) as narrow:
        for hash_, wait_for in (("#/overview", "table"), ("#/decisions", "table"),
                                ("#/decision/" + decisions[0]["name"], "#graph .node")):  # fmt: skip
            open_page(narrow, url + hash_, wait_for)
            width = narrow.execute_script("return document.documentElement.scrollWidth")
            assert width <= narrow.execute_script("return window.innerWidth"), hash_
        script = "return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()"
        parts = {"map": "svg.decision-map", "graph": "#graph", "details": "#details"}
        boxes = {name: narrow.execute_script(script, css) for name, css in parts.items()}
        assert boxes["map"]["bottom"] <= boxes["graph"]["top"] + 1
        assert boxes["graph"]["bottom"] <= boxes["details"]["top"] + 1
        assert all(0 <= box["left"] < 800 for box in boxes.values())


def test_a_feature_page_shows_its_label_score_and_receptive_field(browser, site):
    url, data = site
    dict_id, spec = next((k, v) for k, v in data["dictionaries"].items() if v["labels"])
    with_page = {p["index"] for p in spec["feature_pages"]}
    fields = spec["labels"]["field"]  # [] for a feature that never fired on the export's instances
    label_only = next(i for i in range(spec["features"]) if i not in with_page and fields[i])
    for index in (min(with_page), label_only):
        open_page(browser, url + f"#/feature/{quote(dict_id, safe='')}/{index}", ".feature-label")
        category, label = spec["labels"]["features"][index][:2]
        assert browser.find_element(By.CSS_SELECTOR, ".feature-label .label-text").text == label
        category_name = spec["labels"]["categories"][category]
        assert browser.find_element(By.CSS_SELECTOR, ".feature-label .category").text == category_name
        assert browser.find_elements(By.CSS_SELECTOR, "svg.field rect") and browser.find_elements(
            By.CSS_SELECTOR, "svg.descriptor-bars rect"
        )
        assert console_errors(browser) == []
    silent = [i for i in range(spec["features"]) if not fields[i]]
    if silent:
        open_page(browser, url + f"#/feature/{quote(dict_id, safe='')}/{silent[0]}", ".feature-label")
        assert "never fires" in browser.find_element(By.ID, "content").text


def search(browser, url: str, words: str) -> list[str]:
    open_page(browser, url + "#/features", "#feature-search")
    box = browser.find_element(By.ID, "feature-search")
    box.clear()
    box.send_keys(words)
    return [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#content table tr")[1:]]


def test_the_search_finds_features_by_category_and_by_index(browser, site):
    url, data = site
    labelled = [(k, i, row) for k, v in data["dictionaries"].items() if v["labels"]
                for i, row in enumerate(v["labels"]["features"])]  # fmt: skip
    categories = data["dictionaries"][labelled[0][0]]["labels"]["categories"]
    category = categories[labelled[0][2][0]]
    expected = sum(categories[row[0]] == category for _, _, row in labelled)
    rows = search(browser, url, category)
    assert len(rows) == min(expected, 200) and all(category in r for r in rows)
    rows = search(browser, url, "#3")
    assert rows and all(" #3 " in f" {r} " for r in rows)
    assert len(rows) == sum(i == 3 for _, i, _ in labelled)
    assert console_errors(browser) == []


def test_decision_graph_nodes_show_their_labels(browser, site_dir):
    decisions = json.loads((site_dir / "data" / "decisions.json").read_text())
    labelled = next(n for d in decisions for n in d["nodes"] if n["kind"] == "feature" and n.get("label"))
    with serve(site_dir) as url:
        entry = next(d for d in decisions if labelled in d["nodes"])
        open_page(browser, url + f"#/decision/{entry['name']}", "#graph .node.feature")
        assert entry["in_words"] in browser.find_element(By.CSS_SELECTOR, ".in-words").text
        node = browser.find_element(By.CSS_SELECTOR, f"#graph .node[data-id='{labelled['id']}']")
        assert labelled["label"] in node.find_element(By.TAG_NAME, "title").get_attribute("textContent")
        browser.execute_script("arguments[0].dispatchEvent(new Event('mouseenter'))", node)
        assert f"label: {labelled['label']}" in browser.find_element(By.ID, "details").text
