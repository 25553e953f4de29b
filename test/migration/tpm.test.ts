// A guest with a TPM migrates A -> B -> A: each destination's swtpm starts on an empty state,
// and qemu's migration stream brings the TPM (its keys, its NV): what the guest's TPM held on A
// is what it holds back on A after the round trip, and neither host keeps a state the guest left.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { processMatches } from '../../src/qemu/process.js';
import { waitForPasses, twoAgents, assertOwnedBy } from '../helpers/migration.js';
import { NV_INDEX, nvWrite, tpmGuest, withStateTpm } from '../helpers/tpm.js';

t.test('a tpm-crb guest migrates A -> B -> A with its TPM state in the stream', async (t) => {
  const { dir, a, b } = await twoAgents(t);
  const { xml } = await tpmGuest(dir, 'tpmvm');
  const { uuid } = await a.client.define(xml);
  const stateOn = (agent: typeof a) => path.join(agent.config.stateDir, 'tpm', uuid);

  // A first start manufactures the TPM; then a value goes into its NV while the guest is off.
  await a.client.lifecycle('tpmvm', 'start');
  await a.client.lifecycle('tpmvm', 'destroy');
  const ek = await withStateTpm(path.join(stateOn(a), 'tpm2'), dir, (tool) => {
    nvWrite(tool, 'KMTPM-02');
    return tool(['tpm2_readpublic', '-c', '0x81010001']);
  });
  await a.client.lifecycle('tpmvm', 'start');
  const boot = await waitForPasses(a, 'tpmvm', 0);

  const there = await a.client.perform({ domain: 'tpmvm', destination: b.url }, true);
  t.equal(there.job.status, 'completed', 'A -> B completed');
  await assertOwnedBy(t, b, a, 'tpmvm');
  const onB = b.app.agent.domains.get('tpmvm').run!;
  t.ok(onB.swtpm && processMatches(onB.swtpm), "B's swtpm runs");
  t.ok((await fs.readdir(path.join(stateOn(b), 'tpm2'))).includes('tpm2-00.permall'), "B's swtpm holds the TPM state it got from qemu");
  await t.rejects(fs.stat(stateOn(a)), { code: 'ENOENT' }, 'A keeps no TPM state of a guest that left (its definition stays)');
  const mid = await waitForPasses(b, 'tpmvm', boot.passes);
  t.equal(mid.bootId, boot.bootId, 'no reboot');

  const back = await b.client.perform({ domain: 'tpmvm', destination: a.url }, true);
  t.equal(back.job.status, 'completed', 'B -> A completed');
  await assertOwnedBy(t, a, b, 'tpmvm');
  t.notOk(processMatches(onB.swtpm!), "B's swtpm ended with its qemu");
  await t.rejects(fs.stat(stateOn(b)), { code: 'ENOENT' }, 'B keeps none either');
  t.equal((await waitForPasses(a, 'tpmvm', mid.passes)).bootId, boot.bootId, 'still no reboot');

  await a.client.lifecycle('tpmvm', 'destroy');
  const after = await withStateTpm(path.join(stateOn(a), 'tpm2'), dir, (tool) => ({ nv: tool(['tpm2_nvread', NV_INDEX, '-C', 'o', '-s', '8']), ek: tool(['tpm2_readpublic', '-c', '0x81010001']) }));
  t.equal(after.ek, ek, 'the same TPM came back (its endorsement key)');
  t.equal(after.nv, 'KMTPM-02', 'with its NV');
});
