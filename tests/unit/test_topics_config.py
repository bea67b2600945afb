"""Topic layout (contract §5, §6), settings and the command line (contract §7)."""

from __future__ import annotations

import dataclasses

import pytest

from fleetmq.cli import build_parser, env_name, main, settings_from
from fleetmq.config import (
    BrokerSettings,
    BrokerWsSettings,
    Settings,
    parse_broker,
    parse_hostport,
)
from fleetmq.core.topics import Kind, Parsed, Topics, is_valid_node_id, is_valid_root
from fleetmq.errors import ConfigError

# --- topics ----------------------------------------------------------------------------------


def test_topics_build_every_topic_under_the_root() -> None:
    topics = Topics("fleet")

    assert topics.register("n1") == "fleet/n1/register"
    assert topics.heartbeat("n1") == "fleet/n1/heartbeat"
    assert topics.status("n1") == "fleet/n1/status"
    assert topics.reply("n1") == "fleet/n1/reply"
    assert topics.manager_status == "fleet/_manager/status"
    assert (topics.register_filter, topics.heartbeat_filter, topics.status_filter) == (
        "fleet/+/register", "fleet/+/heartbeat", "fleet/+/status")


@pytest.mark.parametrize("kind", [Kind.REGISTER, Kind.HEARTBEAT, Kind.STATUS])
@pytest.mark.parametrize("root", ["fleet", "acme/site1"])
def test_parse_maps_node_topics_to_kind_and_id(root: str, kind: Kind) -> None:
    topics = Topics(root)

    assert topics.parse(f"{root}/microclaw-esp32-f4cfa210/{kind.value}") == Parsed(
        kind, "microclaw-esp32-f4cfa210")


def test_parse_recognises_the_managers_sync_topic_only() -> None:
    topics = Topics("fleet")

    assert topics.parse(topics.sync) == Parsed(Kind.SYNC, "_manager")
    assert topics.parse("fleet/n1/sync") is None


def test_parse_leaves_the_id_level_to_be_validated_by_the_caller() -> None:
    assert Topics("fleet").parse("fleet/bad id/heartbeat") == Parsed(Kind.HEARTBEAT, "bad id")


@pytest.mark.parametrize(
    "topic",
    [
        "fleet", "fleet/n1", "fleet/n1/reply", "fleet/n1/unknown", "fleet/n1/status/extra",
        "fleet/n1/heartbeat/", "other/n1/heartbeat", "fleetx/n1/heartbeat",
        "x/fleet/n1/heartbeat", "/fleet/n1/heartbeat", "Fleet/n1/heartbeat", "",
    ],
)
def test_parse_ignores_topics_outside_the_layout(topic: str) -> None:
    assert Topics("fleet").parse(topic) is None


@pytest.mark.parametrize(
    "topic",
    ["acme/n1/heartbeat", "acme/site2/n1/heartbeat", "acme/site1/x/n1/heartbeat",
     "acme/site1/n1/heartbeat/x"],
)
def test_multi_level_root_parses_only_its_own_topics(topic: str) -> None:
    topics = Topics("acme/site1")

    assert topics.status("n1") == "acme/site1/n1/status"
    assert topics.parse(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "", "+", "#", "replies/+", "replies/#", "a/+/b", "$SYS/broker", "$share/g/replies",
        "fleet/other/reply", "fleet/n1/status", "fleet/n1/register", "fleet/n1/heartbeat",
        "fleet/_manager/status", "fleet/n1/reply/extra", "fleet/n1", "fleet/+/reply",
    ],
)
def test_response_topics_with_wildcards_dollar_or_under_the_root_are_foreign(topic: str) -> None:
    assert Topics("fleet").is_foreign_reply_target(topic, "n1") is True


@pytest.mark.parametrize(
    "topic", ["fleet/n1/reply", "agents/n1/inbox", "fleetx/n1/reply", "replies/fleet/n1", "x"]
)
def test_own_reply_topic_and_outside_topics_are_fine_reply_targets(topic: str) -> None:
    assert Topics("fleet").is_foreign_reply_target(topic, "n1") is False


def test_reply_target_rules_follow_a_multi_level_root() -> None:
    topics = Topics("acme/site1")

    assert topics.is_foreign_reply_target("acme/site1/n2/reply", "n1") is True
    assert topics.is_foreign_reply_target("acme/site1/n1/reply", "n1") is False
    assert topics.is_foreign_reply_target("acme/site2/n1/reply", "n1") is False


@pytest.mark.parametrize("root", ["fleet", "acme/site1", "a.b:c_d-e", "x" * 64, "a/b/c/d"])
def test_plain_topic_roots_are_valid(root: str) -> None:
    assert is_valid_root(root)


@pytest.mark.parametrize(
    "root", ["", "/fleet", "fleet/", "a//b", "fleet/#", "+", "fleet/+", "$SYS", "fl eet", "a\x00"]
)
def test_roots_with_wildcards_dollar_or_empty_levels_are_invalid(root: str) -> None:
    assert not is_valid_root(root)


# --- broker URLs and addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("embedded", BrokerSettings()),
        ("embedded://0.0.0.0:1884", BrokerSettings("embedded", "0.0.0.0", 1884)),
        ("mqtt://broker.local:1883", BrokerSettings("mqtt", "broker.local", 1883)),
        ("mqtt://broker.local", BrokerSettings("mqtt", "broker.local", 1883)),
        ("mqtts://broker.local", BrokerSettings("mqtts", "broker.local", 8883)),
        ("mqtts://broker.local:8884", BrokerSettings("mqtts", "broker.local", 8884)),
        ("mqtt://fleet:s3cret@10.0.0.5:1884",
         BrokerSettings("mqtt", "10.0.0.5", 1884, "fleet", "s3cret")),
        ("mqtt://us%2Fer:p%40ss%3Aw%25rd@h:1",
         BrokerSettings("mqtt", "h", 1, "us/er", "p@ss:w%rd")),
        ("mqtt://onlyuser@h", BrokerSettings("mqtt", "h", 1883, "onlyuser", None)),
    ],
)
def test_parse_broker_reads_scheme_host_port_and_decoded_credentials(
    text: str, expected: BrokerSettings
) -> None:
    assert parse_broker(text) == expected


def test_broker_settings_never_show_the_password() -> None:
    broker = parse_broker("mqtt://fleet:s3cret@h:1884")

    assert broker.describe() == "mqtt://fleet@h:1884"
    assert "s3cret" not in repr(broker)
    assert "s3cret" not in repr(Settings(broker=broker))
    assert broker.embedded is False
    assert parse_broker("embedded").embedded is True


@pytest.mark.parametrize(
    "text", ["http://h:1883", "tcp://h", "h:1883", "mqtt://", "mqtt:///x", "", "broker.local"]
)
def test_parse_broker_refuses_other_urls_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_broker(text)

    message = str(info.value)
    assert "--broker" in message
    assert "mqtt://" in message
    assert "embedded" in message


@pytest.mark.parametrize("text", ["mqtt://h:99999", "mqtt://h:port", "mqtts://h:-1"])
def test_parse_broker_refuses_a_bad_port(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--broker .*port"):
        parse_broker(text)


@pytest.mark.parametrize("text", ["mqtt://h:0", "embedded://127.0.0.1:0"])
def test_parse_broker_refuses_port_zero_instead_of_replacing_it(text: str) -> None:
    with pytest.raises(ConfigError, match="port"):
        parse_broker(text)


def test_parse_broker_refuses_credentials_for_the_embedded_broker() -> None:
    with pytest.raises(ConfigError, match="embedded"):
        parse_broker("embedded://user:pw@127.0.0.1:1883")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), (":8080", ("0.0.0.0", 8080)),
     ("[::1]:9000", ("::1", 9000)), ("localhost:0", ("localhost", 0))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, "--http") == expected


@pytest.mark.parametrize("text", ["8080", "host:", "host:http", "host:65536", "host:-1", ""])
def test_parse_hostport_refuses_other_forms_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--http .*HOST:PORT"):
        parse_hostport(text, "--http")


# --- settings --------------------------------------------------------------------------------


def test_default_settings() -> None:
    settings = Settings()

    assert settings.default_timeout_s == 180.0
    assert settings.mqtt_client_id == "_fleetmq-fleet"
    assert not is_valid_node_id(settings.mqtt_client_id)  # no device can take it over


def test_default_timeout_follows_the_interval_unless_offline_after_is_given() -> None:
    assert Settings(heartbeat_interval_s=10).default_timeout_s == 30.0
    assert Settings(heartbeat_interval_s=10, offline_after_s=45.0).default_timeout_s == 45.0


def test_client_id_derives_from_the_root_or_is_given() -> None:
    assert Settings(topic_root="acme/site1").mqtt_client_id == "_fleetmq-acme-site1"
    assert Settings(client_id="_fleetmq-blue").mqtt_client_id == "_fleetmq-blue"


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().topic_root = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"topic_root": "fleet/#"}, "--topic-root"),
        ({"topic_root": ""}, "--topic-root"),
        ({"topic_root": "$SYS"}, "--topic-root"),
        ({"heartbeat_interval_s": 0}, "--heartbeat-interval"),
        ({"heartbeat_interval_s": 86_401}, "--heartbeat-interval"),
        ({"offline_after_s": 0.0}, "--offline-after"),
        ({"offline_after_s": -5.0}, "--offline-after"),
        ({"client_id": "manager"}, "--client-id"),
        ({"client_id": "node-1"}, "--client-id"),
    ],
)
def test_invalid_settings_raise_config_error_naming_the_option(kwargs: dict[str, object],
                                                               option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        Settings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", [1, 86_400])
def test_interval_bounds_are_inclusive(interval: int) -> None:
    assert Settings(heartbeat_interval_s=interval).heartbeat_interval_s == interval


# --- command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "var"),
    [("--http", "FLEETMQ_HTTP"), ("--topic-root", "FLEETMQ_TOPIC_ROOT"),
     ("--heartbeat-interval", "FLEETMQ_HEARTBEAT_INTERVAL"), ("--broker", "FLEETMQ_BROKER"),
     ("--offline-after", "FLEETMQ_OFFLINE_AFTER"), ("--log-level", "FLEETMQ_LOG_LEVEL")],
)
def test_env_name(option: str, var: str) -> None:
    assert env_name(option) == var


def settings_for(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    return settings_from(build_parser(env or {}).parse_args(["serve", *argv]))


def test_cli_defaults() -> None:
    settings = settings_for([])

    assert settings.broker == BrokerSettings()
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8080)
    assert settings.topic_root == "fleet"
    assert settings.heartbeat_interval_s == 60
    assert settings.default_timeout_s == 180.0
    assert settings.log_level == "info"


ENV = {
    "FLEETMQ_BROKER": "mqtt://user:pw@mq.local:1884",
    "FLEETMQ_HTTP": "0.0.0.0:9000",
    "FLEETMQ_TOPIC_ROOT": "acme/site1",
    "FLEETMQ_HEARTBEAT_INTERVAL": "30",
    "FLEETMQ_OFFLINE_AFTER": "75",
    "FLEETMQ_CLIENT_ID": "_fleetmq-env",
    "FLEETMQ_LOG_LEVEL": "DEBUG",
}


def test_environment_wins_over_defaults() -> None:
    settings = settings_for([], ENV)

    assert settings.broker == BrokerSettings("mqtt", "mq.local", 1884, "user", "pw")
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 9000)
    assert settings.topic_root == "acme/site1"
    assert settings.heartbeat_interval_s == 30
    assert settings.default_timeout_s == 75.0
    assert settings.mqtt_client_id == "_fleetmq-env"
    assert settings.log_level == "debug"


def test_flags_win_over_the_environment() -> None:
    settings = settings_for(
        ["--broker", "embedded://127.0.0.1:2883", "--http", "127.0.0.1:9100",
         "--topic-root", "flagged", "--heartbeat-interval", "20", "--offline-after", "90",
         "--client-id", "_fleetmq-flag", "--log-level", "warning"],
        ENV,
    )

    assert settings.broker == BrokerSettings("embedded", "127.0.0.1", 2883)
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 9100)
    assert settings.topic_root == "flagged"
    assert settings.heartbeat_interval_s == 20
    assert settings.default_timeout_s == 90.0
    assert settings.mqtt_client_id == "_fleetmq-flag"
    assert settings.log_level == "warning"


def test_empty_offline_after_in_the_environment_means_the_default() -> None:
    assert settings_for(["--heartbeat-interval", "10"],
                        {"FLEETMQ_OFFLINE_AFTER": ""}).default_timeout_s == 30.0


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["serve", "--heartbeat-interval", "x"], {}, "--heartbeat-interval"),
        (["serve"], {"FLEETMQ_HEARTBEAT_INTERVAL": "1.5"}, "--heartbeat-interval"),
        (["serve", "--offline-after", "soon"], {}, "--offline-after"),
        (["serve", "--http", "8080"], {}, "--http"),
        (["serve", "--broker", "http://h"], {}, "--broker"),
        (["serve", "--topic-root", "fleet/#"], {}, "--topic-root"),
        (["serve", "--log-level", "loud"], {}, "--log-level"),
        (["serve", "--client-id", "node-1"], {}, "--client-id"),
    ],
)
def test_main_exits_2_on_bad_config_naming_the_option(
    capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str], named: str
) -> None:
    assert main(argv, env=env) == 2

    err = capsys.readouterr().err
    assert err.startswith("fleetmq: error: ")
    assert named in err


def test_serve_help_lists_every_option_with_its_environment_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"], env={})

    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--broker", "--http", "--topic-root", "--heartbeat-interval",
                   "--offline-after", "--log-level"):
        assert option in out
        assert env_name(option) in out


def test_puback_is_receipt_by_default_and_applied_on_request() -> None:
    assert settings_for([]).puback == "receipt"
    assert settings_for(["--puback", "applied"]).puback == "applied"
    assert settings_for([], {"FLEETMQ_PUBACK": "applied"}).puback == "applied"
    with pytest.raises(ConfigError, match=r"--puback 'later' is not receipt or applied"):
        settings_for(["--puback", "later"])


# --- --broker-ws: the embedded broker's MQTT over WebSockets listener ------------------------


def test_broker_ws_is_on_loopback_port_9001_by_default_with_the_embedded_broker() -> None:
    assert settings_for([]).broker_ws == BrokerWsSettings("127.0.0.1", 9001)


def test_broker_ws_is_none_by_default_with_an_external_broker() -> None:
    assert settings_for(["--broker", "mqtt://127.0.0.1:1884"]).broker_ws is None


@pytest.mark.parametrize("value", ["off", "OFF", "none", " off "])
def test_broker_ws_off_opens_no_listener_with_either_broker(value: str) -> None:
    assert settings_for(["--broker-ws", value]).broker_ws is None
    assert settings_for(["--broker", "mqtt://127.0.0.1:1884", "--broker-ws", value]
                        ).broker_ws is None


def test_broker_ws_from_the_environment_and_flags_win() -> None:
    env = {"FLEETMQ_BROKER_WS": "0.0.0.0:9101"}
    assert settings_for([], env).broker_ws == BrokerWsSettings("0.0.0.0", 9101)
    assert settings_for(["--broker-ws", "127.0.0.1:9102"], env).broker_ws == \
        BrokerWsSettings("127.0.0.1", 9102)
    assert settings_for(["--broker-ws", "off"], env).broker_ws is None
    assert settings_for(["--broker-ws", ":9103"]).broker_ws == BrokerWsSettings("0.0.0.0", 9103)


def test_broker_ws_address_with_an_external_broker_is_refused() -> None:
    with pytest.raises(ConfigError, match="--broker-ws is a listener of the embedded broker"):
        settings_for(["--broker", "mqtt://127.0.0.1:1884", "--broker-ws", "127.0.0.1:9001"])


@pytest.mark.parametrize("value", ["9001", "localhost", "127.0.0.1:", "127.0.0.1:0",
                                   "127.0.0.1:65536", "127.0.0.1:ws"])
def test_broker_ws_bad_values_name_the_option_and_off(value: str) -> None:
    with pytest.raises(ConfigError, match="--broker-ws") as info:
        settings_for(["--broker-ws", value])
    assert "off" in str(info.value)


@pytest.mark.parametrize(("argv", "clash"), [
    (["--broker", "embedded://127.0.0.1:9001"], "--broker"),
    (["--http", "127.0.0.1:9001"], "--http"),
    (["--http", "0.0.0.0:9001"], "--http"),
    (["--broker-ws", "0.0.0.0:1883"], "--broker"),
])
def test_broker_ws_on_the_port_of_another_own_listener_is_refused(
        argv: list[str], clash: str) -> None:
    with pytest.raises(ConfigError, match=f"--broker-ws and {clash} both ask for port"):
        settings_for(argv)


def test_own_listeners_may_share_a_port_on_different_addresses() -> None:
    settings = settings_for(["--broker-ws", "127.0.0.2:8080"])
    assert settings.broker_ws == BrokerWsSettings("127.0.0.2", 8080)


@pytest.mark.parametrize("lease", [0.0, 3.9, 3_601.0])
def test_a_lease_out_of_range_is_refused(lease: float) -> None:
    with pytest.raises(ConfigError, match="--lease"):
        Settings(lease_s=lease)


@pytest.mark.parametrize("url", [
    "fleetmq-a:8080", "ftp://fleetmq-a", "http://", "http://user:pw@fleetmq-a:8080",
    "http://fleetmq-a:8080/?x=1", "http://fleetmq-a:8080/#top", "http://fleetmq-a:99999",
])
def test_an_advertise_url_that_is_not_a_plain_http_url_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match="--advertise-url"):
        Settings(advertise_url=url)


def test_lease_and_advertise_url_come_from_flags_or_the_environment() -> None:
    env = {"FLEETMQ_LEASE": "6", "FLEETMQ_ADVERTISE_URL": "http://fleetmq-b:8080"}
    settings = settings_from(build_parser(env).parse_args(["serve"]))
    assert (settings.lease_s, settings.advertise_url) == (6.0, "http://fleetmq-b:8080")
    settings = settings_from(build_parser(env).parse_args(
        ["serve", "--lease", "12", "--advertise-url", "https://fleetmq-a.example/fleet"]))
    assert (settings.lease_s, settings.advertise_url) == (12.0,
                                                           "https://fleetmq-a.example/fleet")
    assert Settings().lease_s == 10.0
    assert Settings().advertise_url is None
