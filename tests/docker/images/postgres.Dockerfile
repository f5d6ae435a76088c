# A stand-in for the official `postgres` image where no registry is reachable (the tests
# of compose/postgres.yaml): Debian's PostgreSQL 15 on the test base image, honouring
# the same POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB and data directory.
ARG BASE_IMAGE=openbeepboop-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends postgresql-15 postgresql-client-15 >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint"]
