import type { FastifyInstance } from 'fastify';

export default async function hostRoutes(app: FastifyInstance): Promise<void> {
  app.get(
    '/host',
    {
      schema: {
        summary: 'This host: identity, qemu, accelerator, protocol versions',
        tags: ['host'],
        response: {
          200: {
            type: 'object',
            required: ['uuid', 'hostname', 'qemuVersion', 'accelerator', 'protocolVersions'],
            properties: {
              uuid: { type: 'string', format: 'uuid' },
              hostname: { type: 'string' },
              qemuVersion: { type: 'string' },
              qemuBinary: { type: 'string' },
              accelerator: { type: 'string', enum: ['kvm', 'tcg'] },
              kvmUsable: { type: 'boolean', description: 'KVM opens and works for qemu, as the user it runs as' },
              qemuUser: { type: 'string', description: 'Whom guests\' qemu runs as (--qemu-user)' },
              firmwares: { type: 'array', items: { type: 'string' }, description: 'the UEFI images qemu\'s firmware descriptors name, in the order <os firmware=\'efi\'> tries them' },
              tpmEmulator: { type: 'boolean', description: 'swtpm is installed: a guest may have an emulated <tpm>' },
              protocolVersions: { type: 'array', items: { type: 'integer' } },
              machineAliases: { type: 'object', additionalProperties: { type: 'string' } },
              migrationAddress: { type: 'string' },
              migrationPorts: { type: 'string' },
              migrationChannels: { type: 'integer', description: 'the most multifd channels one migration uses here, either way (--migration-channels; default one per core, at most 8); a migration uses the lower of both agents\' figures' },
              postcopy: {
                type: 'object',
                description: 'whether this host\'s qemus can receive a postcopy stream (qemu needs userfaultfd; --no-postcopy refuses it), and how they are let',
                required: ['receives', 'how'],
                properties: { receives: { type: 'boolean' }, how: { type: 'string' } },
              },
              accelProbe: {
                type: 'object',
                description:
                  'with --accel auto: how fast KVM and TCG ran the test guest touching fillMiB of RAM, measured once after start (KVM can work and be far slower than TCG, e.g. nested without EPT)',
                required: ['state'],
                properties: {
                  state: { type: 'string', enum: ['not-measured', 'measuring', 'measured'] },
                  accel: { type: 'string', enum: ['kvm', 'tcg'], description: 'what the measurement would choose' },
                  kvmSlow: { type: 'boolean', description: 'guests run on KVM here, but TCG measured faster' },
                  reason: { type: 'string' },
                  kvm: { $ref: 'FillMeasurement#' },
                  tcg: { $ref: 'FillMeasurement#' },
                },
              },
              quarantined: {
                type: 'array',
                description: 'state files found corrupt at start and set aside',
                items: { type: 'object', properties: { file: { type: 'string' }, movedTo: { type: 'string' }, reason: { type: 'string' } } },
              },
            },
          },
          401: { $ref: 'Error#' },
        },
      },
    },
    async () => app.agent.hostInfo(),
  );
}
