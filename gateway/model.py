"""Types that cross packages: outcomes with codes, so that no decision anywhere is made by
matching the text of an error. Text is for people; the enumerations are for programs."""

import enum


# the command actions (CONTRACT.md, docs/mqtt.md): one list for the executor and `mgw command
# sign`; gateway-wide actions take meter "*"
ACTIONS = ("cut_off", "restore", "guarantee_on", "guarantee_off", "topup", "read",
           "sync_time", "release_breaker", "weather_hold", "account_update", "audit_verify",
           "logs", "scan", "trace", "config_update", "software_update")
GATEWAY_ACTIONS = ("release_breaker", "weather_hold", "audit_verify", "logs", "scan", "trace",
                   "config_update", "software_update")
# diagnostics: rate-limited, answered off the executor's thread (a relay command queued
# behind one runs first); scan and trace use a line only between relay transactions
DIAGNOSTIC_ACTIONS = ("audit_verify", "logs", "scan", "trace")
RELAY_ACTIONS = ("cut_off", "restore", "guarantee_on", "guarantee_off")


class GatewayError(Exception):
    """Base of the gateway's own errors: one line for people, naming the file, key or value
    at fault. Subfamilies: storage (StateError, JournalError), configuration (ConfigError),
    lines (PortError), keys (KeyError_)."""


class TxError(str, enum.Enum):
    """Why a line transaction has no answer to give."""
    NO_ANSWER = "no_answer"          # silence until the timeout, every attempt
    GARBLED = "garbled"              # bytes came, but no valid frame (checksum, length)
    FOREIGN = "foreign"              # valid frames, none answering this request
    PORT_CLOSED = "port_closed"      # the serial port could not be opened or was lost
    STOPPING = "stopping"            # the worker is shutting down


class RejectCode(str, enum.Enum):
    """Why a command was not executed; results carry it as `code` beside `reason`."""
    OVERSIZED = "oversized"
    MALFORMED = "malformed"
    BAD_VERSION = "bad_version"
    BAD_ID = "bad_id"
    MISSING_FIELD = "missing_field"
    MISSING_SIGNATURE = "missing_signature"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    NO_KEYS = "no_keys"
    BAD_TIME = "bad_time"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WINDOW_TOO_LONG = "window_too_long"
    REPLAYED_ID = "replayed_id"
    UNKNOWN_METER = "unknown_meter"
    UNKNOWN_ACTION = "unknown_action"
    BAD_PARAMS = "bad_params"
    NO_ACCOUNT = "no_account"
    NO_RELAY = "no_relay"
    GUARANTEE = "guarantee"
    CLOCK_UNTRUSTED = "clock_untrusted"
    RATE_LIMIT = "rate_limit"
    EXPIRED_LOCAL = "expired_local"
    NOT_ALLOWED_LOCALLY = "not_allowed_locally"
    # config_update (gateway/service/reload.py)
    STALE_VERSION = "stale_version"          # made for another configuration version
    INVALID_CONFIG = "invalid_config"        # `mgw config check` would refuse the result
    SECRET_IN_CONFIG = "secret_in_config"    # a private key or broker password in clear
    RESTART_REQUIRED = "restart_required"    # a section read once at start ([uplink], ...)


MAX_TOPIC_BYTES = 256             # a response topic we will publish to, at most


def valid_topic(topic):
    """topic if it is an MQTT topic name we may publish to (a command's response topic):
    UTF-8, 1..MAX_TOPIC_BYTES bytes, no wildcards or NUL, not $SYS; else None."""
    if not isinstance(topic, str) or not topic or topic.startswith("$"):
        return None
    if "+" in topic or "#" in topic or "\0" in topic:
        return None
    try:
        n = len(topic.encode("utf-8"))
    except UnicodeEncodeError:        # lone surrogates
        return None
    return topic if n <= MAX_TOPIC_BYTES else None
