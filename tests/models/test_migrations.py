import uuid

from tests.conftest import PG_ADMIN_URL, _admin_execute, alembic


def test_upgrade_check_downgrade_on_postgres():
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, inspect

    name = f"grove_migrations_{uuid.uuid4().hex[:8]}"
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    try:
        alembic("upgrade", "head", url=url)
        config = Config()
        config.set_main_option("script_location", "migrations")
        config.attributes["database_url"] = url
        config.attributes["configure_logging"] = False
        command.check(config)  # raises if the tables and the models disagree

        engine = create_engine(url)
        tables = set(inspect(engine).get_table_names())
        assert {"projects", "api_keys", "files", "jobs", "job_events", "checkpoints"} <= tables
        alembic("downgrade", "base", url=url)
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        engine.dispose()
    finally:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_events_written_as_warning_read_as_openais_warn(tmp_path):
    """0009: OpenAI's event levels are info, warn and error; events stored before it said `warning`."""
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path}/grove.db"  # the data migration is one UPDATE, the same SQL on every database
    alembic("upgrade", "0008", url=url)
    engine = create_engine(url)
    insert = (
        "INSERT INTO job_events (job_id, created_at, level, type, message) VALUES ('ftjob-x', :at, :level, :type, 'm')"
    )
    with engine.begin() as connection:
        for level, type_ in [("warning", "warning"), ("info", "info"), ("error", "failed")]:
            connection.execute(text(insert), {"at": "2026-12-01 00:00:00", "level": level, "type": type_})
    levels = "SELECT level, type FROM job_events ORDER BY id"
    alembic("upgrade", "head", url=url)
    with engine.connect() as connection:
        assert connection.execute(text(levels)).all() == [("warn", "warning"), ("info", "info"), ("error", "failed")]
    alembic("downgrade", "0008", url=url)
    with engine.connect() as connection:
        assert [row[0] for row in connection.execute(text(levels))] == ["warning", "info", "error"]
    engine.dispose()
