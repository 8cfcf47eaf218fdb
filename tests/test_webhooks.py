"""The webhook decisions (common/webhooks.py), pure: allowlist, signing, retry schedule.
Delivery over HTTP, retries and the receiver's view are in tests/test_events.py."""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from common import webhooks
from common.webhooks import CallbackRejected

ALLOW = webhooks.parse_allowlist("hooks.example.com, 10.0.0.5:9000, *.callers.example.org")
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/comfy", "http://hooks.example.com:8080/x?y=1", "http://HOOKS.example.com./x",
    "http://10.0.0.5:9000/hook", "https://a.callers.example.org/x", "https://b.c.callers.example.org/x",
])
def test_allowed_callbacks(url):
    assert webhooks.check_callback(url, ALLOW, secret_set=True) == url


@pytest.mark.parametrize("url, code", [
    ("http://10.0.0.5:9001/hook", "callback_not_allowed"),  # the allowed port only
    ("http://10.0.0.5/hook", "callback_not_allowed"),
    ("https://callers.example.org/x", "callback_not_allowed"),  # *.domain is not the domain itself
    ("https://hooks.example.com.evil.net/x", "callback_not_allowed"),
    ("http://169.254.169.254/latest/meta-data", "callback_not_allowed"),
    ("http://[::1]:9000/x", "callback_not_allowed"),
    ("file:///etc/passwd", "invalid_callback_url"),
    ("gopher://hooks.example.com/x", "invalid_callback_url"),
    ("https://user:pw@hooks.example.com/x", "invalid_callback_url"),
    ("https://hooks.example.com/a b", "invalid_callback_url"),
    ("https://evil.net\\.callers.example.org/x", "invalid_callback_url"),  # parsers disagree on backslashes
    ("https://evil.net%2f.callers.example.org/x", "invalid_callback_url"),
    ("https://h\u00f6oks.callers.example.org/x", "invalid_callback_url"),
    ("https://hooks.example.com:99999/x", "invalid_callback_url"),
    ("https://hooks.example.com/" + "x" * 3000, "invalid_callback_url"),
    ("", "invalid_callback_url"),
])
def test_refused_callbacks(url, code):
    with pytest.raises(CallbackRejected) as refused:
        webhooks.check_callback(url, ALLOW, secret_set=True)
    assert refused.value.code == code


@pytest.mark.parametrize("url", [
    "https://hooks.example.com#@evil.net/x", "https://hooks.example.com?@evil.net", "https://hooks.example.com/@evil.net",
    "https://a.callers.example.org:443/x;@evil.net", "http://10.0.0.5:9000/?next=http://evil.net",
])
def test_an_allowed_url_is_sent_to_the_host_that_was_checked(url):
    """requests (urllib3) must connect to the very host the allowlist passed."""
    from urllib.parse import urlsplit

    from urllib3.util import parse_url

    assert webhooks.check_callback(url, ALLOW, secret_set=True) == url
    assert parse_url(url).host.lower() == urlsplit(url).hostname


def test_no_secret_or_no_allowlist_disables_callbacks():
    for allow, secret_set in ((ALLOW, False), ((), True)):
        with pytest.raises(CallbackRejected) as refused:
            webhooks.check_callback("https://hooks.example.com/x", allow, secret_set)
        assert refused.value.code == "webhooks_disabled"


def test_callback_events_are_known_and_unique():
    assert webhooks.check_events(["output", "started"]) == ["started", "output"]
    for bad in (["everything"], ["progress", "progress"], "progress", [1]):
        with pytest.raises(CallbackRejected):
            webhooks.check_events(bad)


def test_signature_verifies_with_the_reference_library_and_every_rotated_secret():
    old = "whsec_" + base64.b64encode(b"the-previous-secret-of-32-bytes!").decode()
    body = webhooks.envelope("succeeded", {"task_id": "t1", "status": "succeeded"})
    headers = webhooks.sign_headers([SECRET, old], "msg_t1_succeeded", body)
    assert json.loads(body)["type"] == "task.succeeded"
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, old):
        assert Webhook(secret).verify(body, headers)["data"]["task_id"] == "t1"
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"not-the-secret-at-all-32-bytes!!").decode()).verify(body, headers)


def test_signature_is_over_id_timestamp_and_body():
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=timezone.utc)
    body = b'{"type":"task.failed"}'
    headers = webhooks.sign_headers([SECRET], "msg_1", body, now)
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    again = webhooks.sign_headers([SECRET], "msg_1", body, now)
    assert again["webhook-signature"] == headers["webhook-signature"]
    assert webhooks.sign_headers([SECRET], "msg_2", body, now)["webhook-signature"] != headers["webhook-signature"]


def test_retry_schedule_doubles_up_to_the_cap():
    assert [webhooks.backoff(n, 2, 600) for n in range(1, 12)] == [2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


@pytest.mark.parametrize("status, again", [
    (None, True), (500, True), (503, True), (302, True), (408, True), (429, True),
    (400, False), (401, False), (404, False), (410, False), (422, False),
])
def test_which_answers_are_retried(status, again):
    assert webhooks.retryable(status) is again


def test_a_final_message_keeps_its_id_across_retries():
    assert webhooks.message_id("t1", "succeeded") == webhooks.message_id("t1", "succeeded")
    assert webhooks.message_id("t1", "progress", "1-0") != webhooks.message_id("t1", "progress", "2-0")
