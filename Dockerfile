# The agent of one host in a container: qemu from Debian bookworm, Node 20, the built agent and
# its production dependencies; no tests, no dev dependencies, no npm.
#
#   docker build -t kvm-migrate .
#   compose.yaml runs two of them that migrate to each other (README.md, "In containers").
#
# Every agent flag is set as KVM_MIGRATE_<FLAG>. The image sets the listen address and the
# state directory; the token (KVM_MIGRATE_TOKEN_FILE) and the migration address
# (KVM_MIGRATE_MIGRATION_ADDRESS: the name or address peers reach this container by) are per
# container, and the agent refuses to start without them. Pass /dev/kvm (--device /dev/kvm) for
# KVM: --accel auto (the default) uses it when it works and runs guests on TCG otherwise.

# Node, npm and a C++ tool chain: fs-ext (the state-directory lock) is a native addon.
FROM node:20-bookworm-slim AS toolchain
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
# node-gyp builds the addon against the headers the node image ships instead of downloading
# them from nodejs.org, so the build needs no more than the npm registry.
ENV npm_config_nodedir=/usr/local
WORKDIR /build

# Production dependencies alone, in a stage of their own: a change of the sources does not
# install them again.
FROM toolchain AS deps
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# The agent compiled (TypeScript is a dev dependency) and packed as npm publishes it: the
# "files" of package.json leave out dist/test and dist/bench. Only the product's sources are
# copied, so the tests are not even compiled.
FROM toolchain AS build
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY bin bin
COPY routes routes
COPY src src
COPY openapi openapi
COPY scripts/build-native.sh scripts/
RUN npm run build
# npm packs them too; after the build, so a change of the README does not compile again.
COPY LICENSE README.md ./
RUN npm pack --silent \
 && mkdir /opt/kvm-migrate \
 && tar -xzf kvm-migrate-*.tgz -C /opt/kvm-migrate --strip-components=1

FROM debian:bookworm-slim
# qemu-system-x86 without its recommends (no GUI, no curl/iSCSI/RBD block drivers: the agent
# opens every disk itself and refuses network disks); iproute2 for ss (the watch on an incoming
# stream) and ip (taps of <interface type='network'>); ovmf for <os firmware='efi'>; swtpm and
# swtpm-tools for <tpm>; openssl reads --tls-crl; tini reaps what the agent's children leave
# behind (the agent is no init). qemu-utils (qemu-img) is left out: the agent never runs it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      qemu-system-x86 iproute2 ovmf swtpm swtpm-tools openssl tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
COPY --from=toolchain /usr/local/bin/node /usr/local/bin/node
COPY --from=build /opt/kvm-migrate /opt/kvm-migrate
COPY --from=deps /build/node_modules /opt/kvm-migrate/node_modules
ENV KVM_MIGRATE_LISTEN=0.0.0.0:7100 \
    KVM_MIGRATE_STATE_DIR=/var/lib/kvm-migrate
# The images directory is the agent's default --allow-path (STATE_DIR/images); several hosts'
# agents share it (a guest's disks must be at the same path on both ends of a migration).
VOLUME ["/var/lib/kvm-migrate", "/var/lib/kvm-migrate/images"]
EXPOSE 7100
# Liveness only: /health needs no token. With TLS the agent's certificate names its public
# address, not loopback, so it is not checked here.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD node -e 'const m = /^(?:\[(.+)\]|(.+)):(\d+)$/.exec(process.env.KVM_MIGRATE_LISTEN); \
    const host = m[1] ?? m[2]; \
    const client = require(process.env.KVM_MIGRATE_TLS_CERT ? "node:https" : "node:http"); \
    client.get({ host: /^(0\.0\.0\.0|::)$/.test(host) ? "127.0.0.1" : host, port: m[3], path: "/health", rejectUnauthorized: false, timeout: 4000 }, \
      (res) => process.exit(res.statusCode === 200 ? 0 : 1)).on("error", () => process.exit(1)).on("timeout", () => process.exit(1));'
ENTRYPOINT ["/usr/bin/tini", "--", "node", "/opt/kvm-migrate/dist/bin/kvm-migrate.js"]
CMD ["agent"]
