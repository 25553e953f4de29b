import {
  DEFAULT_DEADLINE_ACTION,
  ESCALATE_AFTER_MS,
  QEMU_DEFAULT_DOWNTIME_MS,
  type DeadlineAction,
  type MigrationOptions,
} from './params.js';

const GiB = 1024 ** 3;

/** One query-migrate sample of an active stream, as the policy reads it. */
export interface ConvergenceSample {
  remainingBytes: number;
  transferredBytes: number;
  totalBytes: number;
  /** qemu's current vCPU throttle (auto-converge), when it reports one. */
  cpuThrottlePercent?: number;
}

/** What the stream follower carries out for the policy (each over the migration monitor). */
export type ConvergenceAction =
  | { kind: 'none' }
  | { kind: 'raise-downtime'; downtimeLimitMs: number }
  /** set-vcpu-dirty-limit: only the vCPUs that write are slowed (KVM with a dirty ring only). */
  | { kind: 'limit-dirty-rate'; mibPerSec: number }
  /** Let qemu's auto-converge throttle the vCPUs beyond the 1% it is held at until now. */
  | { kind: 'engage-auto-converge' }
  /** Pause and finish: the guest stops dirtying memory, the rest copies, the destination resumes it. */
  | { kind: 'pause' }
  /** Switch to postcopy: the guest runs on at the destination at once and pulls what it lacks. */
  | { kind: 'postcopy' }
  | { kind: 'cancel' };

/**
 * Where the policy stands, as the job's stats show it. `step` is the last rung reached:
 * `live` (nothing changed yet), `downtime-raised`, `throttled` (auto-converge engaged or a dirty
 * limit applied), `paused` (the deadline's pause and finish), `postcopy` (the stream switched to
 * postcopy), `giving-up` (the stream is being cancelled: not converging).
 */
export interface ConvergenceState {
  step: 'live' | 'downtime-raised' | 'throttled' | 'paused' | 'postcopy' | 'giving-up';
  /** `off`: not asked for; `held`: qemu's auto-converge is on but kept at 1%; `engaged`: qemu throttles as it sees fit, up to 99%. */
  autoConverge: 'off' | 'held' | 'engaged';
  cpuThrottlePercent?: number;
  dirtyLimit?: { mibPerSec: number; state: 'not-yet' | 'applied' | 'unavailable'; reason?: string };
  /** When the deadline action is taken (completionTimeoutPerGiBSeconds x the guest's RAM); absent: no deadline, or RAM not known yet. */
  deadlineAt?: string;
  deadlineAction: DeadlineAction;
}

type Options = Pick<
  MigrationOptions,
  'progressTimeoutSeconds' | 'maxDowntimeMs' | 'downtimeLimitMs' | 'autoConverge' | 'dirtyLimitMiBps' | 'completionTimeoutPerGiBSeconds' | 'deadlineAction'
>;

/**
 * What to do about a live stream that does not converge: a ladder of steps, cheapest for the
 * guest first, each taken after ESCALATE_AFTER_MS without a new low of what remains while
 * bytes still flow (a stream that moves nothing is stuck, not busy: throttling the guest would
 * not help it, and its bound is the progress timeout):
 *
 * 1. the downtime limit doubles, up to maxDowntimeMs (a longer pause at switch-over, within
 *    what the caller accepted);
 * 2. with postcopy allowed, the stream switches to postcopy (the guest runs on at the
 *    destination within a short pause; what it lacks follows): seconds of slower page access
 *    there cost a busy guest less than minutes of throttling here. Else the guest is throttled:
 *    a dirty-rate limit on the vCPUs that write when asked for and qemu can (KVM with a dirty
 *    ring), else qemu's auto-converge (every vCPU slowed);
 * 3. at the completion deadline (completionTimeoutPerGiBSeconds per GiB of guest RAM from the
 *    stream's start), once the rungs above are taken, the caller's deadline action: `pause` (the guest stops, the rest copies,
 *    it runs on at the destination: a long pause but a finished migration), `postcopy`, or `abort` (the
 *    stream is cancelled, the guest keeps running here: not_converging).
 *
 * Apart from the ladder, a stream whose remaining bytes reach no new low for the progress
 * timeout is cancelled (not_converging), a paused one too; each step starts that clock again,
 * since the step changed what the stream can do. Pure: the caller samples and carries the
 * action out.
 */
export class ConvergencePolicy {
  downtimeLimitMs: number;
  lowestRemaining = Infinity;
  /** The policy cancelled the stream: it ends as not converging, not as cancelled by a caller. */
  gaveUp: 'progress-timeout' | 'deadline' | undefined;
  private readonly started: number;
  private lastProgressAt: number;
  private lastMovedAt: number;
  private lastTransferred = 0;
  private readonly progressTimeoutMs: number;
  private maxDowntimeMs: number;
  private readonly perGiBMs: number;
  private deadlineAt: number | undefined;
  private readonly state_: ConvergenceState;
  private readonly postcopyArmed: boolean;

  /** `postcopyArmed`: the stream may switch to postcopy (see params.ts postcopyArmed). */
  constructor(options: Options, now: number, postcopyArmed: boolean) {
    this.progressTimeoutMs = options.progressTimeoutSeconds * 1000;
    this.downtimeLimitMs = options.downtimeLimitMs ?? QEMU_DEFAULT_DOWNTIME_MS;
    this.maxDowntimeMs = options.maxDowntimeMs ?? this.downtimeLimitMs;
    // Records written before the deadline existed have none: they keep their old behaviour.
    this.perGiBMs = (options.completionTimeoutPerGiBSeconds ?? 0) * 1000;
    this.postcopyArmed = postcopyArmed;
    this.started = now;
    this.lastProgressAt = now;
    this.lastMovedAt = now;
    this.state_ = {
      step: 'live',
      autoConverge: options.autoConverge ? 'held' : 'off',
      // The switch is the ladder's last rung where the stream can take it; else the guest stays safe here.
      deadlineAction: options.deadlineAction ?? (postcopyArmed ? 'postcopy' : DEFAULT_DEADLINE_ACTION),
      ...(options.dirtyLimitMiBps ? { dirtyLimit: { mibPerSec: options.dirtyLimitMiBps, state: 'not-yet' as const } } : {}),
    };
  }

  /** A sample of an active stream at `now`. */
  observe(sample: ConvergenceSample, now: number): ConvergenceAction {
    if (sample.cpuThrottlePercent !== undefined) this.state_.cpuThrottlePercent = sample.cpuThrottlePercent;
    if (this.deadlineAt === undefined && this.perGiBMs > 0 && sample.totalBytes > 0) {
      this.deadlineAt = this.started + Math.round((this.perGiBMs * sample.totalBytes) / GiB);
      this.state_.deadlineAt = new Date(this.deadlineAt).toISOString();
    }
    if (sample.transferredBytes > this.lastTransferred) this.lastMovedAt = now;
    this.lastTransferred = sample.transferredBytes;
    const moving = now - this.lastMovedAt <= ESCALATE_AFTER_MS;
    if (this.gaveUp) return { kind: 'none' };

    if (sample.remainingBytes < this.lowestRemaining) {
      this.lowestRemaining = sample.remainingBytes;
      this.lastProgressAt = now;
    }
    if (this.state_.step === 'postcopy') return { kind: 'none' };
    const paused = this.state_.step === 'paused';
    // A small guest's deadline can come before the stream stalled at all: the rungs below go first.
    if (!paused && this.deadlineAt !== undefined && now >= this.deadlineAt && moving && this.ladderSpent()) {
      if (this.state_.deadlineAction === 'abort') return this.giveUp('deadline');
      if (this.state_.deadlineAction === 'postcopy' && this.postcopyArmed) return this.switchToPostcopy();
      this.state_.step = 'paused';
      this.lastProgressAt = now;
      return { kind: 'pause' };
    }
    const sinceProgress = now - this.lastProgressAt;
    if (!paused && moving && sinceProgress > ESCALATE_AFTER_MS) {
      const step = this.nextStep();
      if (step.kind !== 'none') {
        this.lastProgressAt = now;
        return step;
      }
    }
    if (this.progressTimeoutMs > 0 && sinceProgress > this.progressTimeoutMs) return this.giveUp('progress-timeout');
    return { kind: 'none' };
  }

  /**
   * An operator set the downtime limit of the running stream (PATCH /jobs/{id}; qemu has it
   * already): the schedule goes on from there, and never lowers it again.
   */
  tuned(downtimeLimitMs: number): void {
    this.downtimeLimitMs = downtimeLimitMs;
    this.maxDowntimeMs = Math.max(this.maxDowntimeMs, downtimeLimitMs);
  }

  /** A caller asked the stream to complete now (POST /jobs/{id}/complete): the policy takes no further step. */
  completing(mode: 'postcopy' | 'pause'): void {
    this.state_.step = mode === 'postcopy' ? 'postcopy' : 'paused';
  }

  /** qemu applied the dirty-rate limit. */
  dirtyLimitApplied(): void {
    if (this.state_.dirtyLimit) this.state_.dirtyLimit = { ...this.state_.dirtyLimit, state: 'applied' };
  }

  /** qemu refused the dirty-rate limit (`reason`, its words): the throttle step falls back to auto-converge, if allowed. */
  dirtyLimitRefused(reason: string): ConvergenceAction {
    if (this.state_.dirtyLimit) this.state_.dirtyLimit = { ...this.state_.dirtyLimit, state: 'unavailable', reason };
    return this.nextStep();
  }

  /** The policy's state for the job's stats (a copy). */
  state(): ConvergenceState {
    return { ...this.state_, ...(this.state_.dirtyLimit ? { dirtyLimit: { ...this.state_.dirtyLimit } } : {}) };
  }

  /** Why the stream ended after the policy cancelled it (error code not_converging). */
  notConvergingMessage(): string {
    const left = `never less than ${(this.lowestRemaining / 1048576).toFixed(1)} MiB left`;
    const why =
      this.gaveUp === 'deadline'
        ? `the completion deadline passed (${this.perGiBMs / 1000}s per GiB of guest RAM) and the deadline action is abort`
        : `no progress for ${this.progressTimeoutMs / 1000}s`;
    return (
      `${why}: the guest dirties memory faster than the stream carries it (${left}); ` +
      `try more bandwidth, a higher maxDowntimeMs, or deadlineAction pause`
    );
  }

  /** Every rung below the deadline is taken (or not asked for). */
  private ladderSpent(): boolean {
    const s = this.state_;
    const throttleLeft = !this.postcopyArmed && (s.dirtyLimit?.state === 'not-yet' || (s.autoConverge === 'held' && s.dirtyLimit?.state !== 'applied'));
    return this.downtimeLimitMs >= this.maxDowntimeMs && !throttleLeft;
  }

  /** The next rung of the ladder below the deadline, or none when every one is taken. */
  private nextStep(): ConvergenceAction {
    const s = this.state_;
    if (this.downtimeLimitMs < this.maxDowntimeMs) {
      this.downtimeLimitMs = Math.min(this.downtimeLimitMs * 2, this.maxDowntimeMs);
      s.step = 'downtime-raised';
      return { kind: 'raise-downtime', downtimeLimitMs: this.downtimeLimitMs };
    }
    if (this.postcopyArmed) return this.switchToPostcopy();
    if (s.dirtyLimit?.state === 'not-yet') {
      s.step = 'throttled';
      return { kind: 'limit-dirty-rate', mibPerSec: s.dirtyLimit.mibPerSec };
    }
    if (s.autoConverge === 'held' && s.dirtyLimit?.state !== 'applied') {
      s.autoConverge = 'engaged';
      s.step = 'throttled';
      return { kind: 'engage-auto-converge' };
    }
    return { kind: 'none' };
  }

  private switchToPostcopy(): ConvergenceAction {
    this.state_.step = 'postcopy';
    return { kind: 'postcopy' };
  }

  private giveUp(why: 'progress-timeout' | 'deadline'): ConvergenceAction {
    this.gaveUp = why;
    this.state_.step = 'giving-up';
    return { kind: 'cancel' };
  }
}
