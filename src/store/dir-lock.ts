/**
 * One agent per state directory. Two agents on one directory would both own its guests and both
 * report its host UUID; an flock(2) on STATE_DIR/agent.lock makes the second refuse. The kernel
 * drops the lock when its holder dies (kill -9 included), so there is never a stale lock to
 * judge, and Node opens files close-on-exec, so no qemu the agent starts inherits it.
 */
import fs from 'node:fs';
import path from 'node:path';
import { flockSync } from 'fs-ext';

export class StateDirBusyError extends Error {
  constructor(dir: string, holder: string) {
    super(`state directory ${dir} is in use by another agent (${holder}); one agent per state directory: stop it, or give this one its own --state-dir`);
    this.name = 'StateDirBusyError';
  }
}

export class StateDirLock {
  private constructor(private fd: number | null) {}

  /** Takes the lock or throws StateDirBusyError; the directory must exist. */
  static acquire(dir: string): StateDirLock {
    const file = path.join(dir, 'agent.lock');
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
    try {
      flockSync(fd, 'exnb');
    } catch (err) {
      const holder = fs.readFileSync(file, 'utf8').trim();
      fs.closeSync(fd);
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN' || (err as NodeJS.ErrnoException).code === 'EWOULDBLOCK') {
        throw new StateDirBusyError(dir, holder ? `pid ${holder}` : 'pid unknown');
      }
      throw err;
    }
    // Who holds it, for the refusal message of the next one; the lock, not this text, decides.
    fs.ftruncateSync(fd, 0);
    fs.writeSync(fd, `${process.pid}\n`, 0);
    return new StateDirLock(fd);
  }

  release(): void {
    if (this.fd === null) return;
    fs.closeSync(this.fd);
    this.fd = null;
  }
}
