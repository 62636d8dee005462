"""Alembic environment: runs migrations online against FHIRQ_DATABASE_URL (or the URL passed in
the Alembic config by `core.store.migrate`)."""

from alembic import context

from core.store.db import get_engine
from core.store.schema import metadata

config = context.config
url = config.get_main_option("sqlalchemy.url") or None
connectable = config.attributes.get("connection")

if connectable is None:
    engine = get_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=metadata)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connectable, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()

