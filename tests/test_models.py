"""Today's models and what an answer's end says: parameters adapted to what a model refuses, the
operator's explicit flags kept, the system prompt, the `finish` event, usage in /metrics and the
log, and the provider's own words in an error. Real HTTP, against the fake upstream, which refuses
parameters word for word as OpenAI does for its reasoning models."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from tornado_sse.cli import parse_settings
from tornado_sse.demo import FakeUpstream, Script
from tornado_sse.settings import Settings, SettingsError

from .conftest import API_KEY
from .sseclient import ask
from .test_service import metric

END = ("update", "<END_STREAMING_SSE>")
pytestmark = pytest.mark.gen_test



def error_of(answer) -> dict[str, str]:
    [error] = answer.errors
    assert answer.events[-1] == END and answer.finish is None
    return json.loads(error)


# -- today's OpenAI models: reasoning models refuse max_tokens and any temperature but 1 ----------

@pytest.mark.parametrize("settings", [{"model": "gpt-5-mini"}], indirect=True)
async def test_a_reasoning_model_answers_with_default_flags(base_url, fake: FakeUpstream, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(deltas=["Hi"])
    first = await ask(base_url, "question=q")
    assert first.text == "Hi" and not first.errors
    # Refused by name, adapted, asked again before any token: the limit keeps its value.
    refused, accepted = fake.requests
    assert refused["max_tokens"] == 1024 and "max_completion_tokens" not in refused
    assert accepted["max_completion_tokens"] == 1024 and "max_tokens" not in accepted
    assert "temperature" not in accepted
    # Remembered for the model: the next question goes out right the first time.
    second = await ask(base_url, "question=again")
    assert second.text == "Hi" and len(fake.requests) == 3
    assert fake.requests[2]["max_completion_tokens"] == 1024 and "max_tokens" not in fake.requests[2]
    adapted = [r for r in caplog.records if "refuses 'max_tokens'" in r.getMessage()]
    assert len(adapted) == 1 and adapted[0].levelno == logging.INFO
    assert "gpt-5-mini" in adapted[0].getMessage() and "max_completion_tokens" in adapted[0].getMessage()


@pytest.mark.parametrize("settings", [{"model": "o1"}], indirect=True)
async def test_questions_refused_at_the_same_time_are_all_adapted_and_logged_once(base_url, fake, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(deltas=["ok"], first_token_delay=0.05)
    answers = await asyncio.gather(*(ask(base_url, f"question=q{i}") for i in range(10)))
    assert [a.text for a in answers] == ["ok"] * 10 and not any(a.errors for a in answers)
    # At least two were refused before the first adaptation was kept (all ten, usually; 16
    # requests on a busy machine): the "another stream adapted it first" path ran.
    assert len(fake.requests) >= 12
    assert len([r for r in caplog.records if "refuses 'max_tokens'" in r.getMessage()]) == 1


@pytest.mark.parametrize("settings", [{"model": "o3-mini", "temperature": 0.8}], indirect=True)
async def test_an_explicit_temperature_a_model_refuses_is_an_error_in_the_providers_words(base_url, fake):
    fake.script = Script(deltas=["never"])
    answer = await ask(base_url, "question=q")
    error = error_of(answer)
    assert error["code"] == "upstream_bad_request"
    assert error["message"] == (
        "The model provider rejected the request (400). The provider said: \"Unsupported value: "
        "'temperature' does not support 0.8 with this model. Only the default (1) value is supported.\"")
    # The token limit was adapted on the way; the operator's temperature never dropped.
    assert [r.get("temperature") for r in fake.requests] == [0.8, 0.8]
    assert answer.text == ""


async def test_other_models_get_max_tokens_and_are_asked_for_usage(base_url, fake):
    # Ollama, llama.cpp and older vLLM know only max_tokens: it stays the first thing we send.
    fake.script = Script(deltas=["ok"])
    answer = await ask(base_url, "question=q")
    [request] = fake.requests
    assert request["max_tokens"] == 1024 and "max_completion_tokens" not in request
    assert request["stream_options"] == {"include_usage": True}
    assert answer.finish == {"reason": "stop", "usage": {"input_tokens": 1, "output_tokens": 1}}


async def test_an_upstream_that_refuses_stream_options_still_answers_without_usage(base_url, fake, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(deltas=["a", "b"], refuse=("stream_options",))
    answer = await ask(base_url, "question=q")
    assert answer.text == "ab" and answer.finish == {"reason": "stop"}
    assert [("stream_options" in r) for r in fake.requests] == [True, False]
    await ask(base_url, "question=q")
    assert "stream_options" not in fake.requests[2]


async def test_a_parameter_refused_twice_is_an_error_not_a_loop(base_url, fake):
    # An upstream that refuses max_completion_tokens as well: one retry per parameter, then the
    # provider's words.
    fake.script = Script(deltas=["x"], refuse=("max_tokens", "max_completion_tokens"))
    error = error_of(await ask(base_url, "question=q"))
    assert error["code"] == "upstream_bad_request"
    assert "Unrecognized request argument supplied: max_completion_tokens" in error["message"]
    assert len(fake.requests) == 2


@pytest.mark.parametrize("settings", [{"model": "gpt-5-mini", "reasoning_effort": "minimal"}], indirect=True)
async def test_reasoning_effort_reaches_a_reasoning_model(base_url, fake):
    fake.script = Script(deltas=["ok"])
    assert (await ask(base_url, "question=q")).text == "ok"
    assert fake.requests[-1]["reasoning_effort"] == "minimal"


@pytest.mark.parametrize("settings", [{"reasoning_effort": "high"}], indirect=True)
async def test_reasoning_effort_for_a_model_without_it_is_a_clear_error(base_url, fake):
    error = error_of(await ask(base_url, "question=q"))
    assert error["message"].endswith(
        'The provider said: "Unrecognized request argument supplied: reasoning_effort"')
    assert len(fake.requests) == 1  # an explicit flag is never dropped behind the operator's back


def test_reasoning_effort_is_validated() -> None:
    assert parse_settings(["--reasoning-effort", "low"], {}).reasoning_effort == "low"
    with pytest.raises(SettingsError, match="minimal|low|medium|high"):
        Settings(reasoning_effort="max")


# -- the operator's system prompt -------------------------------------------------------------------

@pytest.mark.parametrize("settings", [{"system_prompt": "Answer in French.", "max_conversation_chars": 10}],
                         indirect=True)
async def test_the_system_prompt_comes_first_and_a_conversation_keeps_it(base_url, fake):
    fake.script = Script(deltas=["Bonjour, longer than ten characters"])
    first = await ask(base_url, "question=Hello")
    conversation = first.meta["conversation"]
    await ask(base_url, f"question=And%20now%3F&conversation={conversation}")
    system = {"role": "system", "content": "Answer in French."}
    assert fake.requests[0]["messages"] == [system, {"role": "user", "content": "Hello"}]
    # The turn bound trims turns, never the system prompt.
    assert fake.requests[1]["messages"][0] == system
    assert fake.requests[1]["messages"][-1] == {"role": "user", "content": "And now?"}


def test_the_system_prompt_file_is_read_at_start_up(tmp_path: Path) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are terse.\nAnswer in one line.\n", encoding="utf-8")
    settings = parse_settings(["--system-prompt-file", str(prompt)], {})
    assert settings.system_prompt == "You are terse.\nAnswer in one line."
    env = parse_settings([], {"TORNADO_SSE_SYSTEM_PROMPT": "Be kind."})
    assert env.system_prompt == "Be kind."


@pytest.mark.parametrize("args, words", [
    (["--system-prompt-file", "/nonexistent/prompt.txt"], "invalid --system-prompt-file"),
    (["--system-prompt", "a", "--system-prompt-file", "/etc/hostname"], "not both"),
])
def test_a_bad_system_prompt_file_stops_start_up_with_one_line(args, words, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_settings(args, {})
    assert stopped.value.code == 2 and words in capsys.readouterr().err


# -- why an answer ended, and what it cost ----------------------------------------------------------

@pytest.mark.parametrize("reason", ["length", "content_filter"])
async def test_the_finish_event_says_why_the_answer_ended_before_the_end_frame(base_url, fake, reason):
    fake.script = Script(deltas=["cut"], finish_reason=reason)
    answer = await ask(base_url, "question=two%20words")
    s = answer.meta["stream"]
    usage = '{"input_tokens": 2, "output_tokens": 1}'
    assert answer.body.endswith(
        f"id: {s}.2\nevent: update\ndata: cut\n\n"
        f'id: {s}.3\nevent: finish\ndata: {{"reason": "{reason}", "usage": {usage}}}\n\n'
        f"id: {s}.4\nevent: update\ndata: <END_STREAMING_SSE>\n\n".encode())
    assert fake.requests[0]["stream_options"] == {"include_usage": True}


async def test_usage_is_counted_in_metrics_and_the_summary_line(base_url, fake, http_client, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(deltas=["a", "b", "c"])
    await ask(base_url, "question=one%20two")
    await ask(base_url, "question=three")
    text = (await http_client.fetch(base_url + "/metrics")).body.decode()
    assert metric(text, 'tornado_sse_tokens_total{type="input"}') == 3
    assert metric(text, 'tornado_sse_tokens_total{type="output"}') == 6
    assert metric(text, 'gen_ai_client_token_usage_count{gen_ai_token_type="input"}') == 2
    assert metric(text, 'gen_ai_client_token_usage_sum{gen_ai_token_type="output"}') == 6
    assert metric(text, 'gen_ai_client_token_usage_bucket{gen_ai_token_type="output",le="4.0"}') == 2
    assert metric(text, "gen_ai_client_operation_time_to_first_chunk_seconds_count") == 2
    assert metric(text, "tornado_sse_time_to_first_token_seconds_count") == 2  # kept as it was
    [first, _] = [r for r in caplog.records if r.name == "tornado_sse.stream"]
    assert first.getMessage().endswith(" finish=stop input_tokens=2 output_tokens=3")
    assert (first.finish_reason, first.input_tokens, first.output_tokens) == ("stop", 2, 3)


async def test_a_stream_without_a_token_logs_no_ttft_rather_than_none(base_url, fake, caplog):
    caplog.set_level(logging.INFO)
    fake.script = Script(fail="status", status=500)
    await ask(base_url, "question=q")
    [summary] = [r for r in caplog.records if r.name == "tornado_sse.stream"]
    assert " ttft=- " in summary.getMessage() and "None" not in summary.getMessage()
    assert summary.ttft_ms is None and not hasattr(summary, "finish_reason")


# -- the provider's own words ------------------------------------------------------------------------

async def test_litellms_400_for_an_unknown_model_reaches_the_page_in_its_words(base_url, fake):
    fake.script = Script(fail="status", status=400, error_style="litellm")
    error = error_of(await ask(base_url, "question=q"))
    assert error == {"code": "upstream_bad_request", "message": (
        "The model provider rejected the request (400). The provider said: \"Invalid model name "
        "passed in model=test-model. Call `/v1/models` to view available models for your key.\"")}


async def test_azures_content_filter_refusal_of_a_question_has_its_own_sentence(base_url, fake):
    fake.script = Script(fail="status", status=400, error_style="azure_content_filter")
    error = error_of(await ask(base_url, "question=q"))
    assert error == {"code": "upstream_content_filter", "message":
                     "The model provider's content filter refused this question (400). Please rephrase it."}


@pytest.mark.parametrize("message", [
    f"Incorrect API key provided: {API_KEY}. You can find your API key at the dashboard.",
    f"Incorrect API key provided: sk-test-{'*' * 20}1b. Check it.",
    "Header was Authorization: Bearer abc.def.ghi and was refused",
    "Rate limit reached in organization org-Q1w2E3r4T5y6 on requests per min",
    "signature " + "9f" * 20 + " did not match",
])
async def test_the_providers_words_never_carry_a_secret(base_url, fake, message, caplog):
    fake.script = Script(fail="status", status=401, error_message=message)
    error = error_of(await ask(base_url, "question=q"))
    said = error["message"].split("The provider said: ", 1)[1]
    assert "[redacted]" in said
    for secret in (API_KEY, "sk-test-", "abc.def.ghi", "org-Q1w2E3r4T5y6", "9f" * 20):
        assert secret not in error["message"]
    assert API_KEY not in caplog.text


async def test_the_providers_words_are_shortened_to_one_line(base_url, fake):
    fake.script = Script(fail="status", status=400, error_message="Bad\nrequest " + "word " * 100)
    message = error_of(await ask(base_url, "question=q"))["message"]
    said = message.split("The provider said: ", 1)[1]
    assert said.startswith('"Bad request word') and said.endswith('..."') and len(said) <= 202
    assert "\n" not in message
