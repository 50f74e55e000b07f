"""ServeSettings: `waldo serve` flags win over WALDO_* variables, which win over the defaults."""

from __future__ import annotations

import pytest

from waldo import cli
from waldo.serve import ServeSettings


@pytest.fixture
def clean_env(monkeypatch):
    for name in ServeSettings.model_fields:
        monkeypatch.delenv(f"WALDO_{name.upper()}", raising=False)
    return monkeypatch


def test_environment_over_defaults_and_keywords_over_environment(clean_env):
    assert ServeSettings().max_k == 100 and ServeSettings().compile_rrt is True
    clean_env.setenv("WALDO_MAX_K", "40")
    clean_env.setenv("WALDO_COMPILE_RRT", "false")
    clean_env.setenv("WALDO_MAX_UPLOAD_BYTES", "")  # empty: unset, the default stays
    settings = ServeSettings()
    assert (settings.max_k, settings.compile_rrt, settings.max_upload_bytes) == (40, False, 20 * 1024 * 1024)
    assert ServeSettings(max_k=12).max_k == 12


def test_bad_settings_fail_at_start_up_naming_the_setting(clean_env):
    with pytest.raises(ValueError, match="max_k"):
        ServeSettings(max_k=0)
    with pytest.raises(ValueError, match="default_k"):
        ServeSettings(max_k=5, default_k=6)
    with pytest.raises(ValueError, match="max_kk"):
        ServeSettings(max_kk=5)  # a misspelt setting is not silently ignored
    with pytest.raises(ValueError, match="frozen"):
        ServeSettings().max_k = 3  # frozen: the app reads one set of numbers
    clean_env.setenv("WALDO_QUERY_SLOTS", "many")
    with pytest.raises(ValueError, match="query_slots"):
        ServeSettings()


def test_serve_flags_override_environment(clean_env, monkeypatch, tmp_path, capsys):
    import uvicorn

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: captured.update(settings=app.state.settings))
    (tmp_path / "manifest.json").write_text("{}")  # cmd_serve only checks that it exists; the app opens lazily

    def serve(*flags: str) -> ServeSettings | None:
        captured.clear()
        code = cli.main(["serve", "--index", str(tmp_path), *flags])
        return captured.get("settings") if code == 0 else None

    clean_env.setenv("WALDO_MAX_K", "40")
    clean_env.setenv("WALDO_QUERY_SLOTS", "3")
    settings = serve("--max-k", "12", "--max-upload-mb", "1.5", "--no-compile-rrt")
    assert (settings.max_k, settings.query_slots) == (12, 3)
    assert settings.max_upload_bytes == int(1.5 * 1024 * 1024) and settings.compile_rrt is False
    assert serve().max_k == 40
    assert serve("--max-k", "0") is None
    assert "max_k" in capsys.readouterr().err
