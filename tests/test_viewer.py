"""circuit.html in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by selenium with the system chromedriver: never a browser download).

The circuit is a real one: RelP on a tiny random Gemma 3 with random sae-lens dictionaries,
positions kept, cards from a feature store over a small text corpus. Hostile strings are
put into a label, a card's context tokens, a promoted token and the prompt tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from featcircuits.cards import StoreSettings, circuit_features, feature_store
from featcircuits.discover import discover_circuit
from featcircuits.export import to_node_link
from featcircuits.graph import Thresholds
from featcircuits.labels import label_nodes
from featcircuits.tasks import make_pairs, tokenize_pairs
from featcircuits.viewer import embed_json, render_html, write_html
from test_cards import tiny_spliced  # noqa: E402 (tests/ is on sys.path under pytest)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
XSS = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">',
       '</script><script>window.__pwned = 3</script>']


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("viewer")
    sm, corpus = tiny_spliced(tmp, 16, 20)
    model = sm.model
    batch, _ = tokenize_pairs(make_pairs("sva-simple", 8, seed=0), model.tokenizer)
    circuit = discover_circuit(sm, batch, "relp", thresholds=Thresholds(top_k=25), aggregation="none",
                               progress=False)
    data = to_node_link(circuit)
    ids = [n["id"] for n in data["nodes"]]
    store = feature_store(sm, str(corpus), StoreSettings(tokens=800, top_k=6, batch=4),
                          features=circuit_features(ids), cache=tmp / "cache", progress=False)
    cards = store.cards_for_nodes(ids)
    assert cards, "the circuit has feature nodes with cards"
    # as discover records it: the card headings name the corpus the contexts come from
    data.setdefault("metadata", {}).setdefault("provenance", {})["cards"] = {"corpus": store.meta["corpus"]}
    hostile = next(iter(cards))
    cards[hostile]["top"][0]["tokens"][0] = XSS[0]
    cards[hostile]["top"][0]["tokens"][1] = XSS[2]
    cards[hostile]["promoted"][0]["token"] = XSS[1]
    labels = label_nodes(data["nodes"], cards)
    labels[hostile] = XSS[1]
    n_pos = 1 + max(n.get("position", -1) for n in data["nodes"])
    tokens = [f"{XSS[1]} {i}" for i in range(n_pos)]
    path = write_html(tmp / "circuit.html", data, cards, labels, prompt_tokens=tokens)
    return {"path": path, "data": data, "cards": cards, "hostile": hostile, "labels": labels}


def test_embedded_json_cannot_close_its_script_block():
    text = embed_json({"a": XSS[2], "b": "\u2028"})
    assert "<" not in text and ">" not in text and "\u2028" not in text
    assert json.loads(text) == {"a": XSS[2], "b": "\u2028"}


def test_page_is_self_contained(page):
    html = Path(page["path"]).read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and "<script src" not in html and "<link" not in html
    assert html.count("<script") == 2  # the data block and the viewer, nothing injected


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files", "--window-size=1400,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _open(browser, page):
    browser.get(Path(page["path"]).resolve().as_uri())
    return browser


def test_renders_every_node_without_console_errors(browser, page):
    from selenium.webdriver.common.by import By

    _open(browser, page)
    drawn = {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, ".node")}
    assert drawn == {str(n["id"]) for n in page["data"]["nodes"]}
    assert len(browser.find_elements(By.CSS_SELECTOR, "path.edge")) == len(page["data"]["links"])
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_clicking_a_node_pins_its_card_with_example_text(browser, page):
    from selenium.webdriver.common.by import By

    _open(browser, page)
    nid = next(k for k in page["cards"] if k != page["hostile"])
    browser.find_element(By.CSS_SELECTOR, f'.node[data-id="{nid}"]').click()
    card = browser.find_element(By.ID, "card").text
    assert page["labels"][nid] in card
    example = page["cards"][nid]["top"][0]
    assert "".join(example["tokens"]).replace("\n", "\u23ce").strip()[:20] in card.replace("\n", "")
    assert "Strongest incoming edges" in card
    assert f"Top activating contexts \u2014 corpus.txt, {page['data']['metadata']['provenance']['cards']['corpus']['tokens']:,} tokens" in card
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_hostile_strings_show_as_text_and_run_nothing(browser, page):
    from selenium.webdriver.common.by import By

    _open(browser, page)
    browser.find_element(By.CSS_SELECTOR, f'.node[data-id="{page["hostile"]}"]').click()
    card = browser.find_element(By.ID, "card")
    text = card.text
    for s in XSS:
        assert s in text.replace("\n", "")
    assert browser.execute_script("return window.__pwned === undefined")
    assert card.find_elements(By.TAG_NAME, "img") == [] and card.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.CSS_SELECTOR, "body img") == []
    axis = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".collabel")]
    assert axis and all(t.startswith(XSS[1]) for t in axis)


def test_edge_slider_and_search(browser, page):
    from selenium.webdriver.common.by import By

    _open(browser, page)
    shown = "return [...document.querySelectorAll('path.edge')].filter(p => p.style.display !== 'none').length"
    before = browser.execute_script(shown)
    browser.execute_script("const s = document.getElementById('edgeslider'); s.value = 100;"
                           "s.dispatchEvent(new Event('input'))")
    after = browser.execute_script(shown)
    assert before > after >= 1  # only the strongest edge(s) remain at 100 %
    nid = page["hostile"]
    box = browser.find_element(By.ID, "search")
    box.send_keys(nid.partition("@")[0])
    dim = {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, ".node.dim")}
    assert nid not in dim and len(dim) > 0


def test_render_handles_a_graph_without_cards():
    html = render_html({"nodes": [{"id": "metric", "kind": "metric", "site": "metric"}], "links": []})
    assert "featcircuitsViewer" in html and '"cards": {}' in html


def test_summed_circuit_renders_every_node(browser, tmp_path):
    """Aggregation ``sum`` (no token axis), with every node kind, labels needing escapes, no cards."""
    from selenium.webdriver.common.by import By

    from test_export import make_circuit

    data = to_node_link(make_circuit("sum"))
    path = write_html(tmp_path / "circuit.html", data)
    browser.get(path.resolve().as_uri())
    drawn = {e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, ".node")}
    assert drawn == {str(n["id"]) for n in data["nodes"]}
    assert browser.find_elements(By.CSS_SELECTOR, ".collabel") == []
    labelled = next(n for n in data["nodes"] if n.get("label") and "<&>" in n["label"])
    browser.find_element(By.CSS_SELECTOR, f'.node[data-id="{labelled["id"]}"]').click()
    assert labelled["label"] in browser.find_element(By.ID, "card").text
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
