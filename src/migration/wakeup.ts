/**
 * The pause of a poll loop that an event cuts short (qemu's MIGRATION events, an operator's
 * request). An event while no pause runs, say while a query is in flight, is kept: the next
 * pause then ends at once, so no event is lost between a query and the wait after it.
 */
export class Wakeup {
  private pending = false;
  private ended: (() => void) | undefined;

  wake(): void {
    if (this.ended) this.ended();
    else this.pending = true;
  }

  /** Resolves after `ms`, or as soon as wake() is called (or was, since the last pause). */
  sleep(ms: number): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => this.end(resolve), ms);
      this.ended = () => {
        clearTimeout(timer);
        this.end(resolve);
      };
    });
  }

  private end(resolve: () => void): void {
    this.ended = undefined;
    resolve();
  }
}
