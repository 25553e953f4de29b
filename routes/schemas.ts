/** Shared JSON schemas: registered once with addSchema so the OpenAPI document names them. */
export const errorSchema = {
  $id: 'Error',
  type: 'object',
  required: ['code', 'message'],
  properties: {
    code: { type: 'string', description: 'stable machine-readable error code' },
    message: { type: 'string' },
    element: { type: 'string', description: 'the domain XML element refused, when the error is about one' },
    errors: {
      type: 'array',
      description: 'domain XML: every blocker found in one pass, the one above first',
      items: {
        type: 'object',
        required: ['code', 'element', 'message'],
        properties: { code: { type: 'string' }, element: { type: 'string' }, message: { type: 'string' } },
      },
    },
    domain: { type: 'string' },
    job: { type: 'string' },
  },
  additionalProperties: true,
} as const;

export const domainInfoSchema = {
  $id: 'DomainInfo',
  type: 'object',
  required: ['name', 'uuid', 'state', 'persistent'],
  properties: {
    name: { type: 'string' },
    uuid: { type: 'string', format: 'uuid' },
    state: {
      type: 'string',
      enum: ['shutoff', 'running', 'paused', 'migrating', 'incoming', 'unreachable'],
      description: 'unreachable: its qemu runs but its monitor has not answered since the agent started (another client on it, a slow host); the agent keeps trying to attach, and refuses lifecycle actions (503 domain_unreachable) meanwhile',
    },
    reason: { type: 'string', description: 'why the domain is in this state (e.g. crashed, destroyed, migrated, start_failed, monitor_not_answering)' },
    reasonMessage: { type: 'string', description: 'for start_failed: what qemu said; for unreachable: since when, and the last error' },
    persistent: { type: 'boolean' },
    memoryKiB: { type: 'integer' },
    vcpus: { type: 'integer' },
    machine: { type: 'string' },
    pid: { type: 'integer' },
    startedAt: { type: 'string', format: 'date-time' },
    qemuStatus: { type: 'string', description: 'the run state qemu reports over QMP (query-status)' },
    job: {
      type: 'object',
      properties: { id: { type: 'string' }, role: { type: 'string', enum: ['source', 'destination'] } },
    },
    graphics: {
      type: 'array',
      description: "a running domain's displays, as qemu reports them (query-vnc, query-spice): where each listens, with the port an autoport display got",
      items: {
        type: 'object',
        required: ['type'],
        properties: {
          type: { type: 'string', enum: ['vnc', 'spice'] },
          listen: { type: 'string', description: "the address it listens on; absent for a SPICE display with <listen type='none'/>" },
          port: { type: 'integer' },
        },
      },
    },
  },
} as const;

export const errorResponses = {
  400: { $ref: 'Error#' },
  401: { $ref: 'Error#' },
  404: { $ref: 'Error#' },
  409: { $ref: 'Error#' },
  422: { $ref: 'Error#' },
} as const;

export const domainNameParams = {
  type: 'object',
  required: ['name'],
  properties: { name: { type: 'string', pattern: '^[A-Za-z0-9_.-]{1,64}$' } },
} as const;

export const fillMeasurementSchema = {
  $id: 'FillMeasurement',
  type: 'object',
  required: ['accel', 'fillMiB'],
  properties: {
    accel: { type: 'string', enum: ['kvm', 'tcg'] },
    fillMiB: { type: 'integer' },
    fillMs: { type: 'integer', description: "from the guest's boot to the end of its fill; absent when it did not finish within the bound" },
    failure: { type: 'string' },
  },
} as const;
