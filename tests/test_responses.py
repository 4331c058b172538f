"""/ask on the Responses API backend, through the real server against the fake's /v1/responses;
and the fake's wire format, read by the openai SDK's own typed parser."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import tornado.ioloop
import tornado.web
from openai.types.responses import ResponseError, ResponseErrorEvent, ResponseFailedEvent

from tornado_sse.app import make_app
from tornado_sse.backend import Delta, Finish, Usage
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.errors import ErrorInStream, IncompleteStream, MalformedChunk
from tornado_sse.responses import ResponsesBackend, parse_response_event
from tornado_sse.settings import Settings

from .conftest import API_KEY
from .sseclient import ask, open_raw, read_until
from .test_ask import FAILURES, TRICKY, assert_failed_cleanly

END = ("update", "<END_STREAMING_SSE>")



@pytest.fixture
def app(settings: Settings, io_loop: tornado.ioloop.IOLoop) -> Iterator[tornado.web.Application]:
    backend = ResponsesBackend(settings)
    app = make_app(settings, backend)
    yield app
    for stream in list(app.settings["registry"].streams.values()):
        stream.abort()
    io_loop.run_sync(backend.close)


def summary(text: str) -> dict[str, Any]:
    return {"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "output_index": 0,
            "summary_index": 0, "delta": text}


def incomplete(reason: str) -> dict[str, Any]:
    return {"type": "response.incomplete",
            "response": {"id": "resp_1", "object": "response", "status": "incomplete",
                         "incomplete_details": {"reason": reason}}}


@pytest.mark.gen_test
async def test_each_output_text_delta_becomes_one_update_frame(base_url, fake: FakeUpstream):
    fake.script = Script(deltas=["Hello", ", ", "world"])
    answer = await ask(base_url, "question=hi")
    assert answer.status == 200
    assert answer.after_meta == [("update", "Hello"), ("update", ", "), ("update", "world"),
                                 ("finish", '{"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": 3}}'),
                                 END]
    assert fake.completed == 1


@pytest.mark.gen_test
async def test_the_upstream_gets_input_messages_model_and_max_output_tokens(base_url, fake, settings):
    fake.script = Script(deltas=["ok"])
    await ask(base_url, "question=What%20is%20SSE%3F")
    [request] = fake.requests
    assert request["input"] == [{"role": "user", "content": "What is SSE?"}]
    assert request["model"] == settings.model
    assert request["max_output_tokens"] == settings.max_tokens
    assert request["stream"] is True
    assert "messages" not in request and "max_tokens" not in request
    assert "temperature" not in request and "reasoning" not in request  # not set: not sent


@pytest.mark.gen_test
async def test_tricky_deltas_reach_the_client_unchanged(base_url, fake):
    fake.script = Script(deltas=list(TRICKY))
    answer = await ask(base_url, "question=q")
    assert [data for event, data in answer.after_meta] == [
        *TRICKY, json.dumps({"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": len(TRICKY)}}),
        "<END_STREAMING_SSE>"]
    assert answer.text == "".join(TRICKY)


@pytest.mark.gen_test
async def test_unicode_passes_byte_exact_and_crlf_arrives_as_a_line_break(base_url, fake):
    fake.script = Script(deltas=["\u00e9\u00e8", "\U0001f680", "\u4e2d\u6587", "a\r\nb"])
    answer = await ask(base_url, "question=q")
    assert "event: update\ndata: \U0001f680\n\n".encode() in answer.body
    assert answer.text == "\u00e9\u00e8\U0001f680\u4e2d\u6587a\nb"


@pytest.mark.gen_test
async def test_reasoning_deltas_are_reasoning_events_never_answer_text(base_url, fake):
    fake.script = Script(deltas=[
        summary("Thinking"), summary(" hard..."),
        {"type": "response.reasoning_text.delta", "item_id": "rs_1", "output_index": 0,
         "content_index": 0, "delta": "raw thought"},
        "Answer",
    ])
    answer = await ask(base_url, "question=q")
    assert answer.after_meta[:-2] == [("reasoning", "Thinking"), ("reasoning", " hard..."),
                                      ("reasoning", "raw thought"), ("update", "Answer")]
    assert answer.finish is not None and answer.finish["reason"] == "stop"
    assert answer.text == "Answer"


@pytest.mark.gen_test
async def test_events_without_answer_text_are_ignored(base_url, fake):
    fake.script = Script(deltas=[
        {"type": "response.reasoning_summary_part.added", "item_id": "rs_1", "output_index": 0,
         "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
        {"type": "response.output_text.annotation.added", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "annotation_index": 0, "annotation": {"type": "url_citation"}},
        {"type": "response.web_search_call.in_progress", "item_id": "ws_1", "output_index": 0},
        {"type": "response.some_future_event", "detail": {"error": None}},
        "",
        "Answer",
        b": a comment line\n\n",
    ])
    answer = await ask(base_url, "question=q")
    assert answer.after_meta[:-2] == [("update", "Answer")] and answer.events[-2][0] == "finish"


@pytest.mark.gen_test
async def test_the_demo_reply_answers_over_the_responses_api_too(base_url, fake):
    answer = await ask(base_url, "question=Hi%20there")
    assert answer.text.startswith("You asked: **Hi there**\n\n") and answer.events[-1] == END
    assert not answer.errors


# The chat backend's failure table, unchanged: the same scripts give the same codes and words.
@pytest.mark.gen_test
@pytest.mark.parametrize("script, code, words", FAILURES,
                         ids=[f"{s.fail}-{s.status}-{c}" for s, c, _ in FAILURES])
async def test_every_failure_ends_with_the_chat_backends_error_code_and_the_end_frame(
        base_url, fake, script, code, words, caplog):
    fake.script = script
    assert_failed_cleanly(await ask(base_url, "question=q"), script, code, words, caplog.text)
    assert fake.completed == 0


RESPONSES_FAILURES = [
    (Script(deltas=["a", "b"], fail="error_event", fail_after=1, stream_error="response.failed"),
     "upstream_error"),
    (Script(deltas=["a", incomplete("failed_somehow")]), "upstream_error"),
    (Script(deltas=["a", {"type": "error", "error": {"type": "server_error", "message": "boom"}}]),
     "upstream_error"),
    (Script(deltas=["a", b"data: [DONE]\n\n"]), "upstream_incomplete"),
    (Script(deltas=["a", {"delta": "no type"}]), "upstream_malformed"),
    (Script(deltas=["a", {"type": "response.output_text.delta", "delta": 5}]), "upstream_malformed"),
]


@pytest.mark.gen_test
@pytest.mark.parametrize("script, code", RESPONSES_FAILURES, ids=[
    "response.failed", "incomplete-other", "nested-error", "DONE-before-completed",
    "no-type", "delta-not-text"])
async def test_responses_own_failure_events_end_with_an_error_event(base_url, fake, script, code):
    fake.script = script
    answer = await ask(base_url, "question=q")
    assert json.loads(answer.errors[0])["code"] == code
    assert answer.events[-1] == END and answer.text == "a"


@pytest.mark.gen_test
async def test_incomplete_at_max_output_tokens_ends_normally_like_a_length_stop(base_url, fake):
    fake.script = Script(deltas=["cut ", "short", incomplete("max_output_tokens"), "never sent"])
    answer = await ask(base_url, "question=q")
    assert answer.after_meta == [("update", "cut "), ("update", "short"),
                                 ("finish", '{"reason": "length"}'), END]
    assert not answer.errors


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"model": "gpt-5-mini", "reasoning_effort": "low"}], indirect=True)
async def test_reasoning_effort_streams_the_reasoning_summary_as_reasoning_events(base_url, fake):
    fake.script = Script(deltas=["The ", "answer"], summary=["Weighing ", "it."])
    answer = await ask(base_url, "question=q")
    assert answer.after_meta == [("reasoning", "Weighing "), ("reasoning", "it."),
                                 ("update", "The "), ("update", "answer"),
                                 ("finish", '{"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": 2}}'),
                                 END]
    [request] = fake.requests
    assert request["reasoning"] == {"effort": "low", "summary": "auto"}
    assert "temperature" not in request


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"model": "o4-mini", "temperature": 0.2}], indirect=True)
async def test_an_explicit_temperature_a_reasoning_model_refuses_is_the_providers_error(base_url, fake):
    answer = await ask(base_url, "question=q")
    error = json.loads(answer.errors[0])
    assert error["code"] == "upstream_bad_request" and answer.events[-1] == END
    assert error["message"].endswith(
        "The provider said: \"Unsupported parameter: 'temperature' is not supported with this model.\"")


@pytest.mark.gen_test
@pytest.mark.parametrize("settings", [{"upstream_transport": "aiohttp"}], indirect=True)
async def test_the_sdks_aiohttp_client_streams_the_same(base_url, fake):
    fake.script = Script(deltas=["a\nb", " \u00e9"])
    assert (await ask(base_url, "question=q")).text == "a\nb \u00e9"
    for fail in ("truncate", "reset"):
        fake.script = Script(deltas=["x", "y"], fail=fail, fail_after=1)
        cut = await ask(base_url, "question=q")
        assert cut.text == "x" and json.loads(cut.errors[0])["code"] == "upstream_incomplete"


async def _wait_for_disconnect(fake: FakeUpstream, closed_at: float) -> None:
    while not fake.disconnects and time.monotonic() - closed_at < 2:
        await asyncio.sleep(0.002)


@pytest.mark.gen_test
async def test_closing_the_browser_aborts_the_upstream_at_once(port, fake):
    fake.script = Script(tokens=1000, token_delay=0.01)
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"event: update")
    closed_at = time.monotonic()
    writer.close()
    await _wait_for_disconnect(fake, closed_at)
    [gone] = fake.disconnects
    assert gone.at - closed_at < 0.1
    written = gone.chunks_written
    await asyncio.sleep(0.1)
    assert fake.disconnects[0].chunks_written == written and fake.completed == 0


@pytest.mark.gen_test
async def test_the_abort_reaches_a_silent_upstream_too(port, fake):
    fake.script = Script(deltas=["first", "second"], token_delay=10)
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"data: first")
    closed_at = time.monotonic()
    writer.close()
    await _wait_for_disconnect(fake, closed_at)
    assert fake.disconnects and fake.disconnects[0].at - closed_at < 0.1


@pytest.mark.gen_test
async def test_the_abort_reaches_an_upstream_that_has_not_answered_yet(port, fake):
    fake.script = Script(fail="hang")
    reader, writer = await open_raw(port, "/ask?question=q")
    await read_until(reader, b"\r\n\r\n")
    await asyncio.sleep(0.05)
    closed_at = time.monotonic()
    writer.close()
    await _wait_for_disconnect(fake, closed_at)
    assert fake.disconnects and fake.disconnects[0].at - closed_at < 0.1


@pytest.mark.gen_test
async def test_twenty_concurrent_streams_are_all_correct(base_url, fake):
    fake.script = Script(tokens=30, token_delay=0.005)
    answers = await asyncio.gather(*(ask(base_url, f"question=q{i}") for i in range(20)))
    expected = "".join(f"tok{i} " for i in range(30))
    assert [a.text for a in answers] == [expected] * 20
    assert fake.completed == 20


# The fake speaks the real format: the SDK's own typed parser, with strict validation of every
# event against its published types, reads it.

def sdk_client(upstream: tuple[FakeUpstream, int]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=API_KEY, base_url=f"http://127.0.0.1:{upstream[1]}/v1",
                              max_retries=0, _strict_response_validation=True)


@pytest.mark.gen_test
async def test_the_sdks_typed_parser_reads_the_fakes_stream(upstream):
    fake = upstream[0]
    text = "Hello\nw\u00f6rld \U0001f600"
    fake.script = Script(deltas=["Hel", "lo\n", "w\u00f6rld \U0001f600"])
    client = sdk_client(upstream)
    try:
        stream = await client.responses.create(model="m", input=[{"role": "user", "content": "hi"}],
                                               max_output_tokens=50, stream=True)
        events = [event async for event in stream]
    finally:
        await client.close()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["ResponseCreatedEvent", "ResponseInProgressEvent", "ResponseOutputItemAddedEvent",
                     "ResponseContentPartAddedEvent", *["ResponseTextDeltaEvent"] * 3,
                     "ResponseTextDoneEvent", "ResponseContentPartDoneEvent",
                     "ResponseOutputItemDoneEvent", "ResponseCompletedEvent"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    done = events[-1]
    assert done.type == "response.completed"
    assert done.response.status == "completed" and done.response.output_text == text
    assert done.response.usage is not None and done.response.usage.output_tokens == 3
    assert done.response.max_output_tokens == 50 and done.response.model == "m"


@pytest.mark.gen_test
async def test_the_sdks_typed_parser_reads_the_fakes_reasoning_summary(upstream):
    upstream[0].script = Script(deltas=["ok"], summary=["Sum", "mary"])
    client = sdk_client(upstream)
    try:
        stream = await client.responses.create(model="gpt-5-mini", input="hi", stream=True,
                                               reasoning={"effort": "minimal", "summary": "auto"})
        events = [event async for event in stream]
    finally:
        await client.close()
    kinds = [type(e).__name__ for e in events]
    assert kinds[2:9] == ["ResponseOutputItemAddedEvent", "ResponseReasoningSummaryPartAddedEvent",
                          *["ResponseReasoningSummaryTextDeltaEvent"] * 2,
                          "ResponseReasoningSummaryTextDoneEvent", "ResponseReasoningSummaryPartDoneEvent",
                          "ResponseOutputItemDoneEvent"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = events[-1]
    assert done.type == "response.completed" and done.response.output_text == "ok"
    [reasoning, _] = done.response.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Summary"
    assert done.response.reasoning is not None and done.response.reasoning.effort == "minimal"


@pytest.mark.gen_test
async def test_the_sdks_stream_helper_accumulates_the_fakes_events_into_the_final_response(upstream):
    upstream[0].script = Script(deltas=["a", "b", "c"])
    client = sdk_client(upstream)
    try:
        async with client.responses.stream(model="m", input="hi") as stream:
            text = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    finally:
        await client.close()
    assert text == ["a", "b", "c"] and final.output_text == "abc"


@pytest.mark.gen_test
@pytest.mark.parametrize("stream_error, kind", [("error", "ResponseErrorEvent"),
                                                ("response.failed", "ResponseFailedEvent")])
async def test_the_sdks_typed_parser_reads_the_fakes_failure_events(upstream, stream_error, kind):
    upstream[0].script = Script(deltas=["a", "b"], fail="error_event", fail_after=1,
                                stream_error=stream_error)
    client = sdk_client(upstream)
    try:
        stream = await client.responses.create(model="m", input="hi", stream=True)
        events = [event async for event in stream]
    finally:
        await client.close()
    last = events[-1]
    assert type(last).__name__ == kind
    error = last.response.error if isinstance(last, ResponseFailedEvent) else last
    assert isinstance(error, (ResponseError, ResponseErrorEvent))
    assert error.code == "server_error" and error.message


@pytest.mark.gen_test
async def test_the_sdk_reads_the_fakes_status_failures_as_its_typed_errors(upstream):
    upstream[0].script = Script(fail="status", status=429, error_code="insufficient_quota")
    client = sdk_client(upstream)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.responses.create(model="m", input="hi", stream=True)
    finally:
        await client.close()
    assert caught.value.code == "insufficient_quota"


# parse_response_event, a pure function: one row per shape of event.

@pytest.mark.parametrize("data, parsed", [
    (b'{"type":"response.output_text.delta","delta":"a\\nb"}', Delta("update", "a\nb")),
    (b'{"type":"response.output_text.delta","delta":""}', None),
    (b'{"type":"response.reasoning_summary_text.delta","delta":"hm"}', Delta("reasoning", "hm")),
    (b'{"type":"response.reasoning_text.delta","delta":"hm"}', Delta("reasoning", "hm")),
    (b'{"type":"response.completed","response":{}}', Finish("stop")),
    (b'{"type":"response.completed","response":{"usage":{"input_tokens":3,"output_tokens":5}}}',
     Finish("stop", Usage(3, 5))),
    (b'{"type":"response.incomplete","response":{"incomplete_details":{"reason":"max_output_tokens"}}}',
     Finish("length")),
    (b'{"type":"response.incomplete","response":{"incomplete_details":{"reason":"content_filter"}}}',
     Finish("content_filter")),
    (b'{"type":"response.created","response":{"error":null}}', None),
    (b'{"type":"response.output_text.done","text":"all"}', None),
    (b'{"type":"response.refusal.delta","delta":"no"}', None),
])
def test_response_events_parse_to_deltas(data: bytes, parsed: Delta | Finish | None) -> None:
    assert parse_response_event(data) == parsed


@pytest.mark.parametrize("data, error", [
    (b'{"type":"error","code":"server_error","message":"boom","param":null}', ErrorInStream),
    (b'{"type":"response.failed","response":{"status":"failed"}}', ErrorInStream),
    (b'{"type":"response.incomplete","response":{"incomplete_details":{"reason":"other"}}}',
     ErrorInStream),
    (b'{"type":"response.incomplete","response":null}', ErrorInStream),
    (b'{"error":{"message":"boom"}}', ErrorInStream),
    (b"[DONE]", IncompleteStream),
    (b"{not json", MalformedChunk),
    (b"[1, 2]", MalformedChunk),
    (b'{"delta":"x"}', MalformedChunk),
    (b'{"type":"response.output_text.delta"}', MalformedChunk),
    (b'{"type":"response.output_text.delta","delta":["x"]}', MalformedChunk),
])
def test_failure_events_raise_a_typed_error(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_response_event(data)
