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
# from now on, record every full loading overlay over the heatmap, n-best table or step inspector
WATCH_OVERLAYS = """() => { window.overlays = [];
  for (const id of ['heatmap', 'nbest', 'step-plot']) {
    const t = document.querySelector('#' + id + ' [data-testid="status-tracker"]');
    new MutationObserver(() => {
      if (/\\bfull\\b/.test(t.className) && !/\\bhide\\b/.test(t.className)) window.overlays.push(id);
    }).observe(t, {attributes: true, attributeFilter: ['class']});
  }
}"""
# ... and every text the status line under the heatmap shows
WATCH_STATUS = """() => { window.statuses = [];
  const s = document.querySelector('#status'), text = () => s.querySelector('[data-testid="markdown"]').innerText.trim();
  window.statuses.push(text());
  new MutationObserver(() => { if (text() !== window.statuses.at(-1)) window.statuses.push(text()); })
    .observe(s, {subtree: true, childList: true, characterData: true});
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
    assert not page.locator("#step").is_visible()  # no step slider before there is a reply to step through
    assert "띄어쓰기 (space)" in page.locator("#pieces-legend").inner_text()
    assert "</s> = 답변 끝 (end of reply)" in page.locator("#pieces-legend").inner_text()
    send(page, MSG)
    bot_msgs = page.locator("#chat .bot")
    page.wait_for_function("t => document.querySelector('#chat').innerText.includes(t)", arg=expected.text,
                           timeout=30_000)
    heat = wait_for_heatmap(page, len(expected.source_tokens), len(expected.reply_tokens))
    assert heat["ticks"] == expected.source_tokens
    assert bot_msgs.count() >= 1
    page.wait_for_selector("#step-plot .js-plotly-plot .bars", timeout=10_000)  # step inspector drawn
    if len(expected.reply_tokens) > 1:
        slider = page.locator("#step input[type=range]")
        slider.wait_for(state="visible", timeout=10_000)
        assert slider.get_attribute("max") == str(len(expected.reply_tokens))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_chat.png"), full_page=True)


def wait_until_idle(page) -> None:
    """Until the last event is done: the send button is back."""
    page.get_by_role("button", name="보내기 Send").wait_for(state="visible", timeout=30_000)


def send_and_wait(page, bot, message: str) -> str:
    """Send ``message``, wait for its heatmap and for the events after it; returns its status line."""
    expected = bot.reply(message)
    send(page, message)
    wait_for_heatmap(page, len(expected.source_tokens), len(expected.reply_tokens))
    wait_until_idle(page)
    status = f"{len(expected.source_tokens)}개 입력 조각 → {len(expected.reply_tokens)}개 답변 조각"
    page.wait_for_function("t => document.body.innerText.includes(t)", arg=status, timeout=30_000)
    return status


def test_the_finished_heatmap_stays_uncovered(page, served):
    wait_until_idle(page)
    page.evaluate(WATCH_OVERLAYS)
    send_and_wait(page, served[1], "주말에 뭐 하지")
    page.wait_for_timeout(1500)  # the old overlay came about this long after the last piece
    assert page.evaluate("window.overlays") == []  # no full loading overlay over the finished heatmap
    assert page.locator("#heatmap .js-plotly-plot").is_visible()


def test_the_last_turns_status_goes_while_a_reply_streams(page, served):
    wait_until_idle(page)
    page.evaluate(WATCH_STATUS)
    status = send_and_wait(page, served[1], "배고픈데 뭐 먹을까")
    statuses = page.evaluate("window.statuses")
    assert len(statuses) == 3 and statuses[1] == "" and status in statuses[2], statuses  # old, cleared on send, new


def test_repeated_empty_sends_show_one_prompt_of_its_own(page):
    from chatbot.inference import EMPTY_PROMPT

    for _ in range(3):
        wait_until_idle(page)
        send(page, "")
        page.locator("#chat .bot-row", has_text=EMPTY_PROMPT).first.wait_for(timeout=30_000)
    wait_until_idle(page)
    page.wait_for_timeout(500)
    prompts = page.locator("#chat .bot-row", has_text=EMPTY_PROMPT)
    assert prompts.count() == 1
    assert prompts.inner_text().strip().count(EMPTY_PROMPT.split(" (")[0]) == 1  # alone in its bubble


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
    assert "— topic" in page.locator("#chat .bot-row").last.inner_text()  # the model that answered
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_topic.png"), full_page=True)
    page.get_by_label("모델 checkpoint").click()
    page.get_by_role("option", name="plain").click()
    radio.wait_for(state="hidden", timeout=10_000)
    # the chat stays; the next reply names its own model, and so does the earlier-turns picker
    send(page, "안녕")
    page.wait_for_function("() => document.querySelectorAll('#chat .bot-row').length === 2", timeout=30_000)
    wait_until_idle(page)
    replies = page.locator("#chat .bot-row")
    assert "— topic" in replies.nth(0).inner_text() and "— plain" in replies.nth(1).inner_text()
    page.wait_for_function("() => document.querySelector('#turn-pick input').value.endsWith('· plain')",
                           timeout=30_000)
    page.locator("#turn-pick input").click()
    options = page.get_by_role("option").all_inner_texts()
    assert any(o.endswith(f"{message} · topic") for o in options) and any(o.endswith("안녕 · plain") for o in options)
