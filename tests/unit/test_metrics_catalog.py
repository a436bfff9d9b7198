"""The dashboard and the alert rules speak about metrics the workers really export.

Grafana and Prometheus cannot run here (no Docker engine), so the files are checked by
reading them: every metric name they use is defined in ops/metrics.py, every PromQL
expression is well formed (bracket balance, known functions, valid matchers and ranges),
and the rules have what an on-call person needs. With ``promtool`` on PATH (Debian's
``prometheus`` package ships it) the config, the rules and their unit tests
(ops/prometheus/alerts_test.yml) are also checked by Prometheus itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops.metrics import exposed_names

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "ops/grafana/tocsin.json"
PROMETHEUS = REPO / "ops/prometheus"

# Series Prometheus makes itself rather than scraping them.
PROMETHEUS_SERIES = {"up"}
FUNCTIONS = {
    "abs", "absent", "avg", "avg_over_time", "bottomk", "ceil", "clamp_max", "clamp_min",
    "count", "count_over_time", "delta", "deriv", "floor", "histogram_quantile", "increase",
    "irate", "label_replace", "max", "max_over_time", "min", "min_over_time", "quantile",
    "rate", "round", "scalar", "sort_desc", "sum", "sum_over_time", "topk", "vector",
}  # fmt: skip
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}  # fmt: skip
RANGE = re.compile(r"\[(?:\$__rate_interval|\$__interval|(?:\d+[smhdwy])+(?::(?:\d+[smhdwy])+)?)\]")
MATCHERS = re.compile(r'\{\s*(?:\w+\s*(?:=~|!~|!=|=)\s*"[^"]*"\s*(?:,\s*|(?=\})))*\}')


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def rules() -> list[dict]:
    doc = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def promql_names(expr: str) -> set[str]:
    """Metric names an expression selects; fails on malformed PromQL-ish input."""
    for opening, closing in ("()", "[]", "{}"):
        depth = 0
        for char in re.sub(r'"[^"]*"', '""', expr):
            depth += (char == opening) - (char == closing)
            assert depth >= 0, f"unbalanced {closing!r} in {expr!r}"
        assert depth == 0, f"unclosed {opening!r} in {expr!r}"
    for selector in re.findall(r"\{[^{}]*\}", expr):
        assert MATCHERS.fullmatch(selector), f"bad label matchers {selector} in {expr!r}"
    for window in re.findall(r"\[[^\]]*\]", expr):
        assert RANGE.fullmatch(window), f"bad range {window} in {expr!r}"
    text = re.sub(r"\{[^{}]*\}|\[[^\]]*\]", " ", expr)
    # Grouping label lists: by (channel, provider), on (topic) ...
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        word = match.group(0)
        if word.lower() in KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            assert word in FUNCTIONS, f"unknown function {word}() in {expr!r}"
        else:
            names.add(word)
    return names


def base_names(names: set[str]) -> set[str]:
    return names - PROMETHEUS_SERIES


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_metric_used_is_one_the_workers_export(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in rules()]
    assert exprs
    used = set().union(*(promql_names(e) for e in exprs))
    unknown = sorted(base_names(used) - exposed_names())
    assert not unknown, f"{source} uses metrics ops/metrics.py does not define: {unknown}"


def test_the_promql_checker_catches_what_it_claims_to() -> None:
    assert promql_names('sum by (le) (rate(tocsin_match_seconds_bucket{a="b"}[5m]))') == {
        "tocsin_match_seconds_bucket"
    }
    for broken in (
        "sum(rate(tocsin_sends_total[5m])",  # unclosed
        "rate(tocsin_sends_total[5 m])",  # bad range
        'tocsin_sends_total{channel=push"}',  # bad matcher
        "ratez(tocsin_sends_total[5m])",  # unknown function
    ):
        with pytest.raises(AssertionError):
            promql_names(broken)


def test_the_dashboard_answers_the_operators_questions() -> None:
    doc = json.loads(DASHBOARD.read_text())
    exprs = " ".join(dashboard_exprs())
    for metric in (
        "tocsin_ingest_total", "tocsin_consumer_lag", "tocsin_match_seconds_bucket",
        "tocsin_match_reach_bucket", "tocsin_sends_total", "tocsin_provider_failures_total",
        "tocsin_send_retries_total", "tocsin_send_failovers_total",
        "tocsin_ratelimit_waits_total", "tocsin_ratelimit_wait_seconds_total",
        "tocsin_end_to_end_seconds_bucket", "tocsin_dead_letters_total",
        "tocsin_receipts_total", "tocsin_idempotency_hits_total",
    ):  # fmt: skip
        assert metric in exprs, f"no panel shows {metric}"
    assert "histogram_quantile(0.99, sum by (le, channel) (rate(tocsin_end_to_end" in exprs
    assert "histogram_quantile(0.5, sum by (le) (rate(tocsin_match_seconds_bucket" in exprs
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    provisioned = yaml.safe_load(
        (REPO / "ops/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
            assert panel["gridPos"]["w"] <= 24 and panel["targets"]


def test_alert_rules_are_complete_and_cover_the_failure_modes() -> None:
    seen = {}
    for rule in rules():
        name = rule["alert"]
        assert name not in seen, f"duplicate alert {name}"
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0m"))), name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        # Templates name only labels the expression keeps.
        for label in re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])):
            assert label in rule["expr"] or label in ("instance", "job"), (name, label)
        seen[name] = rule["expr"]
    by_metric = {
        "tocsin_consumer_lag": "lag growing",
        "tocsin_dead_letters_total": "DLQ spike",
        "tocsin_provider_failures_total": "provider failure ratio",
        "tocsin_end_to_end_seconds_bucket": "e2e p99",
        'up{job="tocsin-worker"}': "worker down",
        "tocsin_receipts_total": "no receipts while deliveries flow",
    }
    for metric, what in by_metric.items():
        assert any(metric in expr for expr in seen.values()), f"no rule for {what}"
    e2e = next(e for e in seen.values() if "tocsin_end_to_end_seconds_bucket" in e)
    assert "histogram_quantile(0.99" in e2e and e2e.rstrip().endswith("> 5")


def test_prometheus_scrapes_the_workers_and_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file(), rule_file
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    port = int(compose["services"]["worker"]["environment"]["TOCSIN_METRICS_PORT"])
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tocsin-worker")
    # Every replica, not one at random: DNS discovery of the compose service.
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert job["dns_sd_configs"][0]["port"] == port
    # The rules and the dashboard select the job this config scrapes.
    assert any('job="tocsin-worker"' in r["expr"] for r in rules())
    assert any('job="tocsin-worker"' in e for e in dashboard_exprs())


def _promtool() -> str:
    """promtool from PATH or the venv (``make install`` unpacks Debian's into it)."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which("promtool") or shutil.which("promtool", path=venv_bin)
    assert found, "promtool not found: `make install` puts Debian's into the venv"
    return found


def test_promtool_accepts_the_config_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    tool = _promtool()

    def promtool(*args: str) -> None:
        run = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr

    promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    promtool("test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    # Dashboard queries as recording rules: promtool parses each one as PromQL.
    records = [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "5m")}
        for i, e in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    promtool("check", "rules", str(path))
