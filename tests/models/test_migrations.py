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
