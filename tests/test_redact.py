"""core.redact: what counts as a secret in a URL, a text and a recorded detail."""

from __future__ import annotations

from core.redact import redact_text, redact_url, redact_value


def test_secret_query_values_and_user_info_are_replaced() -> None:
    assert redact_url("https://h/x?token=abc&v=1") == "https://h/x?token=REDACTED&v=1"
    assert (
        redact_url("https://s3.example/f?X-Amz-Signature=deadbeef&X-Amz-Date=1")
        == "https://s3.example/f?X-Amz-Signature=REDACTED&X-Amz-Date=1"
    )
    assert redact_url("https://bob:hunter2@host.example/m.bin") == (
        "https://REDACTED@host.example/m.bin"
    )
    plain = "https://huggingface.co/a/b/resolve/main/m.safetensors?download=true"
    assert redact_url(plain) == plain


def test_prefixed_tokens_are_replaced_anywhere_in_a_text() -> None:
    hf = "hf_" + "A1b2C3d4" * 4
    text = f"curl failed: Authorization: Bearer {hf} for https://x.example/?api_key=zz9"
    out = redact_text(text)
    assert hf not in out and "zz9" not in out
    assert "api_key=REDACTED" in out


def test_recorded_details_are_redacted_deeply_but_public_keys_stay() -> None:
    details = {
        "options": {"url": "https://c.example/d?token=s3cret", "name": "box"},
        "password": "pw",
        "host_key": "ssh-ed25519 AAAAC3Nza...",
        "errors": ["see https://u:p@h.example/x"],
    }
    out = redact_value(details)
    assert out["options"] == {"url": "https://c.example/d?token=REDACTED", "name": "box"}
    assert out["password"] == "REDACTED"
    assert out["host_key"] == details["host_key"]
    assert out["errors"] == ["see https://REDACTED@h.example/x"]
    assert "s3cret" not in repr(out) and ":p@" not in repr(out)


def test_the_log_filter_also_redacts_secrets_it_was_not_told() -> None:
    import logging

    from bot.logging_setup import RedactSecrets

    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "download of %s failed (key %s)",
        ("https://c.example/m?token=m3mb3r", "config-secret-1"), None,
    )
    assert RedactSecrets(["config-secret-1"]).filter(record)
    text = record.getMessage()
    assert "m3mb3r" not in text and "config-secret-1" not in text
    assert "token=REDACTED" in text


def test_a_secret_pair_after_a_backtick_is_still_replaced() -> None:
    # Found by the fuzzer: the URL pattern stops at the backtick, leaving the query's
    # tail outside any URL; the token has no recognisable prefix.
    url = "https://127.0.0.1:9/a;touch%20X?x=`id`&token=plainSecret42&y=1"
    out = redact_text(url)
    assert "plainSecret42" not in out and "token=REDACTED&y=1" in out
    assert redact_text("pasted ?api_key=zzz9 alone") == "pasted ?api_key=REDACTED alone"
