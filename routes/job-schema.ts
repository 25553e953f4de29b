import { SOURCE_PHASES, DESTINATION_PHASES } from '../src/migration/phases.js';
import { migrationOptionsSchema } from '../src/migration/params.js';

const phases = [...new Set([...SOURCE_PHASES, ...DESTINATION_PHASES])];
const errorObject = { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' } } } as const;

export const jobSchema = {
  $id: 'Job',
  type: 'object',
  required: ['id', 'role', 'domain', 'status', 'phase', 'createdAt'],
  properties: {
    id: { type: 'string', description: 'the migration id, the same on both agents' },
    role: { type: 'string', enum: ['source', 'destination'] },
    domain: { type: 'string' },
    uuid: { type: 'string' },
    status: { type: 'string', enum: ['running', 'completed', 'failed', 'cancelled'] },
    phase: { type: 'string', enum: phases },
    options: migrationOptionsSchema,
    peer: {
      type: 'object',
      properties: { url: { type: 'string' }, hostUuid: { type: 'string' }, hostname: { type: 'string' } },
    },
    uri: { type: 'string', description: 'the stream URI (qemu syntax)' },
    transport: { $ref: 'StreamTransport#' },
    error: errorObject,
    waiting: { type: 'string', description: 'why the job waits, when it does (e.g. the peer is unreachable)' },
    resolution: {
      type: 'object',
      description: "an operator's decision for a source job whose Finish2 outcome stayed unknown (POST /jobs/{id}/resolve)",
      properties: { outcome: { type: 'string', enum: ['finished', 'aborted'] }, reason: { type: 'string' }, at: { type: 'string', format: 'date-time' } },
    },
    resumedAt: { type: 'string', format: 'date-time', description: 'destination: when the arrived guest resumed here' },
    createdAt: { type: 'string', format: 'date-time' },
    updatedAt: { type: 'string', format: 'date-time' },
    endedAt: { type: 'string', format: 'date-time' },
    phaseHistory: {
      type: 'array',
      items: { type: 'object', properties: { phase: { type: 'string' }, at: { type: 'string', format: 'date-time' } } },
    },
    timings: {
      type: 'object',
      properties: {
        totalMs: { type: 'integer' },
        setupMs: { type: 'integer' },
        prepare2Ms: { type: 'integer', description: "from the caller's request to the destination's Prepare2 answer" },
        firstByteMs: { type: 'integer', description: "from the caller's request to the first byte streamed" },
        streamEndToRunningMs: { type: 'integer', description: "from the stream's end to the guest running on the destination" },
        aroundStreamMs: { type: 'integer', description: "the agent's own cost: totalMs minus qemu's stream time" },
        qemuTotalMs: { type: 'integer' },
        qemuDowntimeMs: { type: 'integer' },
        qemuSetupMs: { type: 'integer' },
        switchoverMs: { type: 'integer' },
        postcopyMs: { type: 'integer', description: 'from the switch to postcopy to the end of the stream: the guest ran at the destination while pages still arrived' },
      },
    },
    stats: {
      type: 'object',
      properties: {
        qemuStatus: { type: 'string' },
        transferredBytes: { type: 'integer' },
        remainingBytes: { type: 'integer' },
        totalBytes: { type: 'integer' },
        throughputBytesPerSec: { type: 'integer' },
        dirtyPagesRate: { type: 'integer' },
        iterations: { type: 'integer' },
        expectedDowntimeMs: { type: 'integer' },
        downtimeLimitMs: { type: 'integer' },
        etaMs: { type: 'integer', description: 'the time the stream has left: a countdown that never rises; absent while it does not converge' },
        convergence: {
          type: 'object',
          description: "source: the convergence policy's last step, its throttle and its deadline",
          properties: {
            step: { type: 'string', enum: ['live', 'downtime-raised', 'throttled', 'paused', 'postcopy', 'giving-up'] },
            autoConverge: { type: 'string', enum: ['off', 'held', 'engaged'], description: 'held: on in qemu but kept at 1% until the policy engages it' },
            cpuThrottlePercent: { type: 'integer', description: "qemu's current vCPU throttle" },
            dirtyLimit: {
              type: 'object',
              properties: {
                mibPerSec: { type: 'integer' },
                state: { type: 'string', enum: ['not-yet', 'applied', 'unavailable'] },
                reason: { type: 'string', description: "qemu's refusal, when unavailable" },
              },
            },
            deadlineAt: { type: 'string', format: 'date-time' },
            deadlineAction: { type: 'string', enum: ['pause', 'abort', 'postcopy'] },
          },
        },
        postcopy: {
          type: 'object',
          description: 'once the stream switched to postcopy: its state, and the recoveries of a broken stream',
          properties: {
            state: { type: 'string', enum: ['active', 'paused', 'recovering'], description: 'paused: the stream broke; both qemus wait, the guest stalls at the destination on the pages it lacks' },
            startedAt: { type: 'string', format: 'date-time' },
            recoveries: { type: 'integer', description: 'breaks recovered so far' },
            attempts: { type: 'integer', description: 'source: recovery attempts on the current break' },
            pausedSince: { type: 'string', format: 'date-time' },
            lastError: { type: 'string' },
            gaveUp: { type: 'boolean', description: 'source: postcopyRecoverySeconds passed; POST /jobs/{id}/recover tries again' },
          },
        },
        percent: { type: 'integer' },
      },
    },
    finish: {
      type: 'object',
      properties: {
        rc: { type: 'integer' },
        attempts: { type: 'integer' },
        outcome: { type: 'string', enum: ['finished', 'aborted'] },
        lastError: { type: 'string' },
      },
    },
    cancelRequested: { type: 'boolean' },
    completeRequested: {
      type: 'object',
      description: 'source: a POST /jobs/{id}/complete, carried out by the stream',
      properties: { mode: { type: 'string', enum: ['postcopy', 'pause'] }, at: { type: 'string', format: 'date-time' } },
    },
    recoveryUri: { type: 'string', description: 'destination: where its broken postcopy stream listens for the source to resume it' },
    runningBeforeMigration: { type: 'boolean', description: 'source: whether the guest ran when the migration started; a rollback runs it again only then' },
  },
} as const;
