"""The chat playground at ``/`` (aetheris/serve/playground.py + aetheris/static/), against the real server on a
tiny random Aetheris.

Without a browser: the page, its files and headers, and that an API key is never in them. In headless
Chromium (skipped when it is absent): the page loads without console errors, a message streams a reply
that equals the server's own non-streaming answer (greedy), a grammar-forced tool call renders with
its arguments, and markup in model output -- real tool arguments forced by an enum, and text fed
through the page's own stream reader -- stays text.
"""

from __future__ import annotations

import copy
import json
import re
import time

import httpx
import openai
import pytest
from browser_helpers import chromium, console_errors, save_screenshot
from serve_helpers import LiveServer, tiny_checkpoint

from aetheris.languages import LANGUAGES
from aetheris.serve import Limits, create_app, load_checkpoint

MODEL = "tiny"
KEY = "sk-playground-test-3f9a"
# Markup a model could write; each variant would set window.__pwned if the page ever parsed it as HTML.
INJECTION = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold?</b>'


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory):
    return tiny_checkpoint(tiny_tokenizer, tmp_path_factory.mktemp("playground") / "tiny")


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    return load_checkpoint(str(checkpoint))


def paced(step, seconds: float = 0.005):
    """``model.step`` taking a few ms per token, as a real model does. This tiny one decodes in
    microseconds, so a whole reply would arrive in one network read and streaming could not be seen."""
    def slow_step(*args, **kwargs):
        time.sleep(seconds)
        return step(*args, **kwargs)
    return slow_step


@pytest.fixture(scope="module")
def live(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model = copy.copy(model)  # a shallow copy with its own paced step; the weights are shared
    model.step = paced(model.step)
    server = LiveServer(create_app(model, tokenizer, model_name=MODEL, limits=Limits(max_tokens=1024)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def live_with_key(model_and_tokenizer):
    server = LiveServer(create_app(*model_and_tokenizer, model_name=MODEL, api_key=KEY))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


# --- without a browser -------------------------------------------------------------------------------


def test_page_and_its_files_are_served_with_a_strict_policy(live):
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    html = page.text
    # Every Tiny Aya language is offered, and nothing is loaded from another origin (no CDN).
    assert all(f">{lang.name} ({lang.iso1})</option>" in html for lang in LANGUAGES)
    assert "http://" not in html and "https://" not in html
    for name, kind in (("playground.js", "text/javascript"), ("playground.css", "text/css")):
        r = httpx.get(f"{live.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
        assert "http://" not in r.text and "https://" not in r.text
    # Only the listed files: nothing else in the package (or beyond it) is reachable.
    for name in ("server.py", "..%2Fserver.py", "playground.html"):
        assert httpx.get(f"{live.url}/static/{name}").status_code == 404
    js = httpx.get(live.url + "/static/playground.js").text
    assert not re.search(r"\.(inner|outer)HTML\s*[+]?=|insertAdjacentHTML\(|document\.write|eval\(", js)


def test_the_page_never_carries_the_api_key(live_with_key):
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        r = httpx.get(live_with_key.url + path)
        assert r.status_code == 200, path  # the page is public; the API behind it is not
        assert KEY not in r.text
    assert httpx.get(live_with_key.url + "/v1/models").status_code == 401


# --- in headless Chromium ----------------------------------------------------------------------------


def wait_for(driver, script: str, timeout: float = 60.0):
    """Poll a JS expression until it is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script("return " + script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(driver, "document.getElementById('status').textContent === 'ready'")


def send(driver, text: str) -> None:
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def last_assistant_done(driver) -> None:
    wait_for(driver, "(() => { const m = document.querySelectorAll('li.msg.assistant');"
                     " return m.length && !m[m.length - 1].classList.contains('streaming'); })()")


def test_a_message_gets_the_servers_own_answer(browser, live):
    open_page(browser, live.url)
    assert browser.find_element("id", "model").text == MODEL
    assert not console_errors(browser)
    # Picking a language writes the system prompt the request will carry.
    browser.find_element("css selector", "#language option[value='Swahili']").click()
    assert browser.find_element("id", "system").get_attribute("value") == "Reply in Swahili."
    for field, value in (("temperature", "0"), ("max-tokens", "60")):
        box = browser.find_element("id", field)
        box.clear()
        box.send_keys(value)
    send(browser, "Habari ya leo?")
    last_assistant_done(browser)
    shown = browser.execute_script("const m = document.querySelectorAll('li.msg.assistant .content');"
                                   " return m[m.length - 1].textContent;")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    reference = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60,
        messages=[{"role": "system", "content": "Reply in Swahili."}, {"role": "user", "content": "Habari ya leo?"}])
    assert shown == reference.choices[0].message.content
    stats = browser.find_element("id", "stats").text
    assert f"{reference.usage.completion_tokens} tokens in" in stats and "tokens/s" in stats, stats
    assert f"prompt {reference.usage.prompt_tokens} tokens" in stats
    assert not console_errors(browser)


def test_a_tool_call_renders_with_its_arguments_as_text(browser, live):
    open_page(browser, live.url)
    browser.find_element("id", "tool-enabled").click()
    name = browser.find_element("id", "tool-name")
    name.clear()
    name.send_keys("render_html")
    # The grammar forces the model's argument to be exactly INJECTION: real model output carrying markup.
    schema = {"type": "object", "properties": {"snippet": {"enum": [INJECTION]}, "n": {"type": "integer",
              "minimum": 1, "maximum": 9}}, "required": ["snippet", "n"], "additionalProperties": False}
    browser.execute_script("document.getElementById('tool-schema').value = arguments[0];", json.dumps(schema))
    browser.find_element("css selector", "#tool-choice option[value='required']").click()
    # One call's JSON is about 150 tokens at this vocabulary, and the model may make several; greedy,
    # so the number of calls is the same on every run.
    for field, value in (("temperature", "0"), ("max-tokens", "1000")):
        box = browser.find_element("id", field)
        box.clear()
        box.send_keys(value)
    # Record the arguments' length at every DOM update. The server streams a call's id and name first and
    # its arguments in one piece once jsonschema has validated them, so the call's card shows up empty
    # before the arguments arrive.
    browser.execute_script("""window.__lengths = []; new MutationObserver(() => {
        const a = document.querySelector('li.msg.assistant .tool-args');
        if (a) window.__lengths.push(a.textContent.length);
      }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    send(browser, "Show me a snippet")
    last_assistant_done(browser)
    assert browser.find_element("css selector", "li.msg.assistant .tool-name").text == "render_html"
    args = json.loads(browser.find_element("css selector", "li.msg.assistant .tool-args").text)
    assert args["snippet"] == INJECTION and 1 <= args["n"] <= 9
    lengths = browser.execute_script("return window.__lengths")
    assert lengths and lengths[0] == 0 and lengths[-1] > 0, lengths  # the card, then the whole arguments
    assert "finish: tool_calls" in browser.find_element("id", "stats").text
    assert browser.find_elements("css selector", "li.msg.assistant form.tool-result")  # send a result back
    assert not browser.find_elements("css selector", "#messages img, #messages script, #messages b")
    assert browser.execute_script("return window.__pwned") is None
    assert not console_errors(browser)
    save_screenshot(browser, "playground")
    # Results go back as tool messages; the model is asked again once every call has one.
    forms = browser.find_elements("css selector", "form.tool-result")
    for form in forms:
        form.find_element("tag name", "input").send_keys("done")
        form.find_element("tag name", "button").click()
    wait_for(browser, "document.querySelectorAll('li.msg.assistant').length === 2")
    last_assistant_done(browser)
    assert len(browser.find_elements("css selector", "li.msg.tool")) == len(forms)
    assert browser.find_element("id", "error").get_attribute("hidden"), browser.find_element("id", "error").text


def test_markup_in_streamed_text_and_errors_stays_text(browser, live):
    """The page's own stream reader fed a reply (and then an error) made of markup. fetch is replaced
    in the page because a random model cannot be made to write a chosen string outside a grammar."""
    open_page(browser, live.url)
    reply = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
             {"choices": [{"index": 0, "delta": {"content": INJECTION[:20]}, "finish_reason": None}]},
             {"choices": [{"index": 0, "delta": {"content": INJECTION[20:]}, "finish_reason": None}]},
             {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
             {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in reply) + "data: [DONE]\n\n"
    browser.execute_script("""
        const sse = arguments[0], injection = arguments[1], realFetch = window.fetch;
        window.__calls = 0;
        window.fetch = (url, init) => {
          if (!String(url).includes('/v1/chat/completions')) return realFetch(url, init);
          window.__calls++;
          if (window.__calls === 1) return Promise.resolve(new Response(sse, {headers: {'Content-Type': 'text/event-stream'}}));
          return Promise.resolve(new Response(JSON.stringify({error: {message: injection}}), {status: 400}));
        };""", sse, INJECTION)
    send(browser, "hello")
    last_assistant_done(browser)
    shown = browser.execute_script("return document.querySelector('li.msg.assistant .content').textContent")
    assert shown == INJECTION
    send(browser, "again")
    wait_for(browser, "!document.getElementById('error').hidden")
    assert browser.find_element("id", "error").text == "400: " + INJECTION
    assert not browser.find_elements("css selector", "#messages img, #messages script, #messages b, #error img")
    assert browser.execute_script("return window.__pwned") is None


def test_the_page_asks_for_the_key_and_uses_it(browser, live_with_key):
    browser.get(live_with_key.url + "/")
    wait_for(browser, "!document.getElementById('auth').hidden")
    assert browser.find_element("id", "send").get_attribute("disabled")
    key = browser.find_element("id", "api-key")
    key.send_keys("wrong-key")
    browser.find_element("css selector", "#auth button").click()
    wait_for(browser, "document.getElementById('status').textContent === 'that key was refused'")
    browser.find_element("id", "api-key").send_keys(KEY)
    browser.find_element("css selector", "#auth button").click()
    wait_for(browser, "document.getElementById('status').textContent === 'ready'")
    assert browser.find_element("id", "model").text == MODEL
    send(browser, "hi")
    last_assistant_done(browser)
    assert browser.find_element("id", "error").get_attribute("hidden")
    assert "tokens in" in browser.find_element("id", "stats").text
    # The key lives in a variable of the page only: not in storage, not in the DOM.
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
    assert KEY not in browser.page_source
    # 401 console entries from the first, keyless probe and the wrong key are expected; nothing else.
    assert all("401" in e for e in console_errors(browser))
