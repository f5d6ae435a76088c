# A stand-in for the official `nginx` image where no registry is reachable (the tests of
# compose/postgres.yaml): Debian's nginx, reading /etc/nginx/conf.d/*.conf as that does.
ARG BASE_IMAGE=openbeepboop-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends nginx >/dev/null \
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/default \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log
STOPSIGNAL SIGQUIT
EXPOSE 80
CMD ["nginx", "-g", "daemon off;"]
