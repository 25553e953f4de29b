import { conflict } from '../errors.js';
import type { DomainDef } from '../domain/model.js';

/** The fields of a domain entry the claim rules read and write. */
export interface ClaimedEntry {
  name: string;
  uuid: string;
  xml: string;
  def: DomainDef;
  persistent: boolean;
  /** The migration job that owns this domain now, if any: lifecycle calls are refused meanwhile. */
  activeJob?: { id: string; role: 'source' | 'destination' };
}

/**
 * Who holds a domain during a migration: a migration's claim on an entry begins here, and ends by
 * a commit (the job succeeded) or a release (it failed). While a claim lasts the job owns the
 * entry. The rules work on the entries map of their owner (the domain manager; the fast tier's
 * simulated host uses the same rules), which does the process work around them.
 */
export class DomainClaims<E extends ClaimedEntry> {
  private readonly entries: Map<string, E>;
  private readonly isActive: (entry: E) => boolean;
  /** The definition a same-named inactive domain had before an arrival borrowed its entry, by name. */
  private readonly borrowed = new Map<string, { xml: string; def: DomainDef }>();

  constructor(entries: Map<string, E>, isActive: (entry: E) => boolean) {
    this.entries = entries;
    this.isActive = isActive;
  }

  /** Refuses a domain another job holds. */
  refuseClaimed(entry: E): void {
    if (!entry.activeJob) return;
    throw conflict('domain_busy', `domain ${entry.name} is already migrating (job ${entry.activeJob.id})`, { domain: entry.name, job: entry.activeJob.id });
  }

  /** The source's claim; the caller has checked that the guest runs and is not still arriving. */
  claimOutgoing(entry: E, jobId: string): void {
    this.refuseClaimed(entry);
    entry.activeJob = { id: jobId, role: 'source' };
  }

  /**
   * The destination's claim on the entry the arriving guest will live in: a new transient one
   * (made by `create`, once the caller has admitted it), or a same-named domain defined here but
   * inactive, whose definition is set aside to be given back if the migration fails.
   */
  claimIncoming(xml: string, def: DomainDef, jobId: string, create: () => E): E {
    for (const other of this.entries.values()) {
      if (other.uuid === def.uuid && other.name !== def.name) {
        throw conflict('uuid_in_use', `uuid ${def.uuid} belongs to domain ${other.name} here`, { domain: other.name });
      }
    }
    const existing = this.entries.get(def.name);
    if (!existing) {
      const entry = create();
      entry.activeJob = { id: jobId, role: 'destination' };
      this.entries.set(def.name, entry);
      return entry;
    }
    if (this.isActive(existing) || existing.activeJob) {
      throw conflict('domain_active', `domain ${def.name} is already active on this host`, { domain: def.name });
    }
    if (existing.uuid !== def.uuid) {
      throw conflict('domain_exists', `a different domain named ${def.name} is defined here`, { domain: def.name });
    }
    this.arrivingInto(existing, xml, def);
    existing.activeJob = { id: jobId, role: 'destination' };
    return existing;
  }

  /**
   * An arrival into this defined domain, also one found under way at start: its qemu runs the XML
   * that arrived, and the stored definition is set aside.
   */
  arrivingInto(entry: E, xml: string, def: DomainDef): void {
    this.borrowed.set(entry.name, { xml: entry.xml, def: entry.def });
    entry.xml = xml;
    entry.def = def;
  }

  /** After an agent restart: the claim of a job whose record says it owns the domain (claims live in memory only). */
  restore(entry: E, jobId: string, role: 'source' | 'destination'): void {
    entry.activeJob = { id: jobId, role };
  }

  /** The arrival succeeded: the definition that arrived is the domain's now. The claim itself ends with end(). */
  keepArrival(entry: E): void {
    this.borrowed.delete(entry.name);
  }

  end(entry: E): void {
    entry.activeJob = undefined;
  }

  /**
   * The job failed: the claim ends, and a borrowed definition is given back. True when the entry
   * is to be forgotten: a transient one whose qemu is gone (an arrival that never took over leaves
   * nothing behind).
   */
  release(entry: E): boolean {
    entry.activeJob = undefined;
    const previous = this.borrowed.get(entry.name);
    this.borrowed.delete(entry.name);
    if (previous) {
      entry.xml = previous.xml;
      entry.def = previous.def;
      return false;
    }
    return !entry.persistent && !this.isActive(entry);
  }
}
