# veer in a container: built with the Rust toolchain image, run on a distroless base as a
# non-root user (uid 65532).
#
#   docker build -t veer .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/veer-conf:/etc/veer:ro" -v veer-state:/var/lib/veer veer
#
# The config is /etc/veer/veer.toml (the default command runs `veer run -c /etc/veer/veer.toml`;
# other commands work too: `docker run veer check -c ...`). Mount the directory that holds it, as
# above, so that hot reload sees every way of editing it. A single-file mount
# (`-v "$PWD/veer.toml:/etc/veer/veer.toml:ro"`) follows the file's inode: writes into that file
# are seen, but an editor that saves by writing a new file and renaming it (vim, sed -i) leaves
# the container on the old content until a restart. `docker kill -s HUP` reloads as well.
# Inside the container:
#   - listen on all interfaces, e.g. `listen = ["0.0.0.0:8080"]`, so the published port reaches
#     veer;
#   - set `[state] dir = "/var/lib/veer"`, a volume writable by the non-root user, so rollout
#     state and the decision journal survive restarts (a relative dir would be resolved next to
#     the read-only config);
#   - the admin API (port 9901) stays on 127.0.0.1 unless published on purpose: then
#     `listen = "0.0.0.0:9901"` with `token_env = "VEER_ADMIN_TOKEN"` and
#     `-e VEER_ADMIN_TOKEN=...`. The health check below asks http://127.0.0.1:9901/healthz
#     either way and reads the same token variable.
# See config/sidecar.toml and config/gateway.toml for complete files.

# The build uses the profile in pgo/ (profile-guided optimisation; README, Performance): the
# image's rustc is the one that wrote it (pgo/rustc-version; with another rustc the build goes
# without it), and the release profile is left as Cargo.toml sets it (the profile matches
# functions by symbol names that hash those settings). The target cache below keeps what it
# compiled with an older profile: after `loadtest/pgo.sh`, clear it first (`docker builder
# prune --filter type=exec.cachemount`).

FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Symbols stay (function names in a backtrace); the line tables, most of the binary, are
# stripped after the build.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p veer --bin veer \
    && install -D -m 0755 target/release/veer /out/veer \
    && strip --strip-debug /out/veer
# An empty state dir owned by the runtime user (the runtime image has no shell to make one).
RUN install -d -o 65532 -g 65532 /out/state

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/veer /usr/local/bin/veer
COPY --from=build --chown=65532:65532 /out/state /var/lib/veer
USER 65532:65532
WORKDIR /var/lib/veer
VOLUME ["/var/lib/veer"]
EXPOSE 8080 9901
HEALTHCHECK --interval=10s --timeout=6s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/veer", "health", "--admin", "http://127.0.0.1:9901"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/veer"]
CMD ["run", "-c", "/etc/veer/veer.toml"]
