"""The demo in a real headless Chromium: stream a Korean reply, read the heatmap, show HTML literally.

Screenshots land in artifacts/ (gitignored) for a person to look at.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from chatbot.loadtest import free_port

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium (apt install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (requirements-dev.txt)")

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
MSG = "오늘 너무 힘들었어"
HOSTILE = "<img src=x onerror=alert(1)> **bold** 좋아하는 사람이 생겼어"
# the heatmap's x tick labels and the figure's row count, as plotly drew them
READ_HEATMAP = """() => {
  const div = document.querySelector('#heatmap .js-plotly-plot');
  if (!div || !div.data || !div.data.length || div.data[0].type !== 'heatmap') return null;
  return {ticks: Array.from(div.querySelectorAll('.xtick text')).map(t => t.textContent),
          rows: div.data[0].z.length};
}"""



@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    from chatbot.demo import build_demo, launch
    from chatbot.inference import ChatBot

    bot = ChatBot.from_checkpoint(tiny_checkpoint, device="cpu")
    demo = build_demo({"tiny": bot})
    _, url, _ = launch(demo, checkpoint_dirs=[tiny_checkpoint], server_port=free_port(),
                       prevent_thread_lock=True, quiet=True)
    yield url, bot
    demo.close()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (playwright's sync API allows one instance per thread)."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(served, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, locale="ko-KR")
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(served[0])
    page.errors = errors
    yield page
    page.close()


def send(page, text: str) -> None:
    box = page.locator("#msg textarea")
    box.fill(text)
    box.press("Enter")


def wait_for_heatmap(page, source_len: int, reply_len: int) -> dict:
    page.wait_for_function(f"() => {{ const h = ({READ_HEATMAP})(); "
                           f"return h && h.ticks.length === {source_len} && h.rows === {reply_len}; }}",
                           timeout=30_000)
    return page.evaluate(READ_HEATMAP)


def test_korean_message_streams_a_reply_and_a_heatmap_of_its_source_pieces(page, served):
    expected = served[1].reply(MSG)
    send(page, MSG)
    bot_msgs = page.locator("#chat .bot")
    page.wait_for_function("t => document.querySelector('#chat').innerText.includes(t)", arg=expected.text,
                           timeout=30_000)
    heat = wait_for_heatmap(page, len(expected.source_tokens), len(expected.reply_tokens))
    assert heat["ticks"] == expected.source_tokens
    assert bot_msgs.count() >= 1
    page.wait_for_selector("#step-plot .js-plotly-plot .bars", timeout=10_000)  # step inspector drawn
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_chat.png"), full_page=True)


def test_html_and_markdown_in_a_message_show_literally(page, served):
    expected = served[1].reply(HOSTILE)
    send(page, HOSTILE)
    page.wait_for_function("t => document.querySelector('#chat').innerText.includes(t)", arg=HOSTILE,
                           timeout=30_000)
    wait_for_heatmap(page, len(expected.source_tokens), len(expected.reply_tokens))
    chat = page.locator("#chat")
    assert chat.locator("img").count() == 0 and chat.locator("strong").count() == 0
    assert "**bold**" in chat.inner_text()
    assert page.errors == []  # no alert(), no script errors
    page.screenshot(path=str(ARTIFACTS / "demo_literal_html.png"), full_page=True)


def test_about_tab_renders_the_equations_and_curves(page):
    page.get_by_role("tab", name="소개 About").click()
    page.wait_for_selector(".katex", timeout=10_000)
    page.wait_for_selector(".js-plotly-plot .scatterlayer .trace", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "demo_about.png"), full_page=True)


@pytest.fixture(scope="module")
def two_models_page(tiny_checkpoint, tiny_topic_checkpoint, browser):
    """A page of the demo serving a plain model (first) and one that reads a topic."""
    from chatbot.demo import build_demo, launch
    from chatbot.inference import ChatBot

    bots = {"plain": ChatBot.from_checkpoint(tiny_checkpoint, device="cpu"),
            "topic": ChatBot.from_checkpoint(tiny_topic_checkpoint, device="cpu")}
    demo = build_demo(bots)
    _, url, _ = launch(demo, server_port=free_port(), prevent_thread_lock=True, quiet=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, locale="ko-KR")
    page.goto(url)
    yield page, bots
    page.close()
    demo.close()


def test_topic_picker_appears_for_a_topic_model_and_steers_its_reply(two_models_page):
    page, bots = two_models_page
    message = "헤어진 지 한 달 됐어"
    radio = page.locator("#topic")
    assert not radio.is_visible()  # the first model reads no topic
    page.get_by_label("모델 checkpoint").click()
    page.get_by_role("option", name="topic").click()
    radio.wait_for(state="visible", timeout=10_000)
    assert radio.get_by_label("자동 auto").is_checked()
    radio.get_by_text("사랑 love").click()
    expected = bots["topic"].reply(message, topic=2)
    send(page, message)
    # the tiny model's replies may hold runs of spaces, which HTML shows as one
    page.wait_for_function("t => document.querySelector('#chat').innerText.replace(/\\s+/g, ' ').includes(t)",
                           arg=" ".join(expected.text.split()), timeout=30_000)
    page.wait_for_function("() => document.body.innerText.includes('선택 chosen')", timeout=30_000)
    assert "사랑 love" in page.locator("body").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_topic.png"), full_page=True)
    page.get_by_label("모델 checkpoint").click()
    page.get_by_role("option", name="plain").click()
    radio.wait_for(state="hidden", timeout=10_000)
