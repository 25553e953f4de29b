import t from 'tap';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { testGuest, waitForJobEnd } from '../helpers/agents.js';
import { runCli } from '../helpers/cli.js';
import { assertOwnedBy, twoAgents, waitForPasses } from '../helpers/migration.js';

t.test('kvm-migrate migrate: progress while it runs, a summary and exit 0 when completed', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { token: 'cli-token' }, b: { token: 'cli-token' } });
  await a.client.define((await testGuest(dir, 'vm1', { fillMiB: 16, hotMiB: 1, reportEvery: 16 })).xml);
  await a.client.lifecycle('vm1', 'start');
  await waitForPasses(a, 'vm1', 0);
  const res = await runCli(['migrate', 'vm1', '--from', a.url, '--to', b.url, '--token', 'cli-token', '--bandwidth', '16', '--downtime', '500']);
  t.equal(res.code, 0, `exit 0 (stderr: ${res.stderr.slice(-300)})`);
  t.match(res.stderr, /migration [0-9a-f-]{36}: vm1/, 'names the migration');
  t.match(res.stderr, /\[[#-]{30}\]\s+\d+%\s+streaming/, 'draws the progress bar while streaming');
  t.match(res.stdout, /^completed, total \d+ ms/, 'summary on stdout');
  await assertOwnedBy(t, b, a, 'vm1');
  const job = (await a.client.jobs())[0]!;
  t.equal(job.options.bandwidthMiBps, 16, 'bandwidth flag carried');
  t.equal(job.options.downtimeLimitMs, 500, 'downtime flag carried');

  const failed = await runCli(['migrate', 'vm1', '--from', b.url, '--to', 'http://127.0.0.3:1', '--token', 'cli-token']);
  t.equal(failed.code, 1, 'exit 1 when the migration failed');
  t.match(failed.stdout, /failed.*peer_unreachable/);
  const refused = await runCli(['migrate', 'vm1', '--from', b.url, '--to', a.url]);
  t.equal(refused.code, 1, 'exit 1 without the token');
  t.match(refused.stderr, /401 unauthorized/);

  const listed = await runCli(['jobs', '--on', a.url, '--token', 'cli-token']);
  t.equal(listed.code, 0);
  t.match(listed.stdout, new RegExp(`^${job.id}  source  vm1  completed  done  .*completed, total \\d+ ms`, 'm'), 'a line per job');
  const notStuck = await runCli(['resolve', job.id, '--on', a.url, '--token', 'cli-token', '--outcome', 'aborted', '--reason', 'x']);
  t.equal(notStuck.code, 1, 'resolve refused for a job that is not stuck');
  t.match(notStuck.stderr, /not_waiting_on_destination|not a source job waiting/);
  const incomplete = await runCli(['resolve', job.id, '--on', a.url, '--outcome', 'maybe', '--reason', 'x']);
  t.match(incomplete.stderr, /must be one of finished, aborted/, 'only finished or aborted');
  t.equal(incomplete.code, 64, 'a usage error');

  // Flags from the environment, booleans included, and the token from a file.
  const tokenFile = path.join(dir, 'token');
  await fs.writeFile(tokenFile, 'cli-token\n', { mode: 0o600 });
  const fromEnv = await runCli(['migrate', 'vm1', '--from', b.url, '--to', a.url], { KVM_MIGRATE_TOKEN_FILE: tokenFile, KVM_MIGRATE_PAUSED: 'yes', KVM_MIGRATE_NO_PERSIST: '1', KVM_MIGRATE_BANDWIDTH: '32' });
  t.equal(fromEnv.code, 0, `exit 0 (stderr: ${fromEnv.stderr.slice(-300)})`);
  const back = (await b.client.jobs()).find((j) => j.role === 'source' && j.status === 'completed')!;
  t.match(back.options, { paused: true, persistDestination: false, bandwidthMiBps: 32 }, 'KVM_MIGRATE_PAUSED, _NO_PERSIST and _BANDWIDTH carried');
  await assertOwnedBy(t, a, b, 'vm1', 'paused');
  await a.client.lifecycle('vm1', 'destroy');
});

t.test('kvm-migrate complete and recover: a running migration finished by postcopy from the CLI; recover refused when nothing is broken', async (t) => {
  const { dir, a, b } = await twoAgents(t, { a: { token: 'cli-token' }, b: { token: 'cli-token' } });
  await a.client.define((await testGuest(dir, 'vm2', { fillMiB: 4, hotMiB: 4, reportEvery: 64 })).xml);
  await a.client.lifecycle('vm2', 'start');
  await waitForPasses(a, 'vm2', 0);
  const { job } = await a.client.perform({ domain: 'vm2', destination: b.url, bandwidthMiBps: 4, allowPostcopy: true, completionTimeoutPerGiBSeconds: 0 });
  const completed = await runCli(['complete', job.id, '--on', a.url, '--token', 'cli-token']);
  t.equal(completed.code, 0, `exit 0 (stderr: ${completed.stderr.slice(-300)})`);
  t.match(completed.stdout, new RegExp(`^${job.id}: completing by postcopy`));
  const recover = await runCli(['recover', job.id, '--on', a.url, '--token', 'cli-token']);
  t.equal(recover.code, 1, 'recover refused: no broken postcopy stream');
  t.match(recover.stderr, /not_in_postcopy|postcopy_not_broken/);
  const badMode = await runCli(['complete', job.id, '--on', a.url, '--token', 'cli-token', '--mode', 'later']);
  t.equal(badMode.code, 64, 'an unknown mode is a usage error');
  const ended = await waitForJobEnd(a.client, job.id, 'the migration', 60_000);
  t.equal(ended.status, 'completed');
  t.ok(ended.phaseHistory.some((p) => p.phase === 'postcopy'), 'completed by postcopy');
  await assertOwnedBy(t, b, a, 'vm2');
  await b.client.lifecycle('vm2', 'destroy');
});
