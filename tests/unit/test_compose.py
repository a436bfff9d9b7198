"""docker-compose.yml cannot run here (no Docker engine); keep it correct by reading it."""

from __future__ import annotations

from pathlib import Path

import yaml

from ops.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TOCSIN_SERVICES = ("worker", "api", "topics", "feeds")


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_tocsin_service_names_only_known_settings() -> None:
    known = Settings.env_names()
    services = _compose()["services"]
    for name in TOCSIN_SERVICES:
        env = services[name]["environment"]
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name}: environment names no setting: {unknown}"


def test_every_compose_setting_value_is_accepted_by_settings(monkeypatch) -> None:
    for name in TOCSIN_SERVICES:
        env = _compose()["services"][name]["environment"]
        for key, value in env.items():
            # ${VAR:?message} is compose interpolation from the operator's .env.
            monkeypatch.setenv(key, "x" if str(value).startswith("${") else str(value))
        settings = Settings()
        assert settings.kafka_bootstrap_servers == "kafka:9092"
        assert settings.redis_url.startswith("redis://redis:6379")
        assert settings.partitions >= 2


def test_workers_wait_for_healthy_kafka_and_redis() -> None:
    worker = _compose()["services"]["worker"]
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["command"] == ["tocsin", "worker"]


def test_every_service_command_is_a_real_tocsin_command() -> None:
    from typer.main import get_command

    from ops.cli import app

    commands = get_command(app).commands  # type: ignore[attr-defined]
    for name in TOCSIN_SERVICES:
        argv = _compose()["services"][name]["command"]
        assert argv[0] == "tocsin" and argv[1] in commands, argv


def test_kafka_is_kraft_single_node_without_auto_create() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    # Tocsin creates its topics with their shapes (compaction, partitions); auto-create
    # would silently make wrong ones.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_only_ops_reads_the_environment() -> None:
    offenders = []
    for package in ("streams", "geofencing", "channels", "templates"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if "os.environ" in text or "os.getenv" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"only ops/ may read the environment: {offenders}"


def test_plain_packages_never_import_faust() -> None:
    offenders = []
    for package in ("geofencing", "channels", "templates"):
        for path in (REPO / package).rglob("*.py"):
            if "import faust" in path.read_text() or "from faust" in path.read_text():
                offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"geofencing/, channels/, templates/ must not import faust: {offenders}"


def _mounts(service: str) -> dict[str, str]:
    """Container path -> repo path of a service's bind mounts (each read-only, each real)."""
    mounts = {}
    for volume in _compose()["services"][service]["volumes"]:
        source, target, *mode = volume.split(":")
        if source.startswith("./"):
            assert mode == ["ro"], f"{service}: {volume} must be mounted read-only"
            assert (REPO / source).exists(), f"{service}: {source} does not exist"
            mounts[target] = source
    return mounts


def test_prometheus_gets_its_config_and_alert_rules_read_only() -> None:
    prometheus = _compose()["services"]["prometheus"]
    mounts = _mounts("prometheus")
    config_path = next(
        a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")
    )
    assert mounts[config_path] == "./ops/prometheus/prometheus.yml"
    config = yaml.safe_load((REPO / mounts[config_path]).read_text())
    for rule_file in config["rule_files"]:
        inside = str(Path(config_path).parent / rule_file)
        assert mounts.get(inside) == "./ops/prometheus/alerts.yml", f"{inside} is not mounted"
    assert "worker" in prometheus["depends_on"]


def test_grafana_provisions_the_prometheus_datasource_and_the_tocsin_dashboard() -> None:
    grafana = _compose()["services"]["grafana"]
    mounts = _mounts("grafana")
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards/tocsin.yml").read_text())["providers"]
    folder = providers[0]["options"]["path"]
    assert mounts[f"{folder}/tocsin.json"] == "./ops/grafana/tocsin.json"
    datasource = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())
    url = datasource["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in grafana["depends_on"]
    assert "prometheus" in _compose()["services"]
