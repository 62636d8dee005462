// fhir-kit-client, unchanged, against a running fhirq.
// Usage: node fhirkit.mjs FHIR_BASE TAG
// Prints one JSON line of what it saw; exits non-zero when an assertion fails.
import assert from 'node:assert/strict';
import { Client } from 'fhir-kit-client';

const [baseUrl, tag] = process.argv.slice(2);
const system = 'urn:fhirq:test:fhirkit';
const client = new Client({ baseUrl });

const capability = await client.capabilityStatement();
assert.equal(capability.fhirVersion, '4.0.1');

const patient = await client.create({
  resourceType: 'Patient',
  body: { resourceType: 'Patient', identifier: [{ system, value: `${tag}-a` }], name: [{ family: 'Kit' }] },
});
assert.equal(patient.meta.versionId, '1');
const read = await client.read({ resourceType: 'Patient', id: patient.id });
assert.equal(read.name[0].family, 'Kit');

const updated = await client.update({
  resourceType: 'Patient',
  id: patient.id,
  body: { ...read, gender: 'female' },
});
assert.equal(updated.meta.versionId, '2');
const history = await client.history({ resourceType: 'Patient', id: patient.id });
assert.equal(history.entry.length, 2);

const found = await client.search({ resourceType: 'Patient', searchParams: { identifier: `${system}|${tag}-a` } });
assert.deepEqual(found.entry.map((e) => e.resource.id), [patient.id]);

const batch = await client.batch({
  body: {
    resourceType: 'Bundle',
    type: 'batch',
    entry: [
      { request: { method: 'GET', url: `Patient/${patient.id}` } },
      { request: { method: 'GET', url: 'Patient/no-such-patient' } },
      { resource: { resourceType: 'Patient', identifier: [{ system, value: `${tag}-b` }] }, request: { method: 'POST', url: 'Patient' } },
    ],
  },
});
assert.deepEqual(batch.entry.map((e) => e.response.status.slice(0, 3)), ['200', '404', '201']);

// A transaction: the Observation's subject names the new Patient by its urn:uuid fullUrl.
const transaction = await client.transaction({
  body: {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: 'urn:uuid:5c8b3c36-0b4f-4d8b-9a35-6f3a8f1f2a11',
        resource: { resourceType: 'Patient', identifier: [{ system, value: `${tag}-c` }] },
        request: { method: 'POST', url: 'Patient' },
      },
      {
        resource: {
          resourceType: 'Observation',
          status: 'final',
          code: { text: 'weight' },
          subject: { reference: 'urn:uuid:5c8b3c36-0b4f-4d8b-9a35-6f3a8f1f2a11' },
        },
        request: { method: 'POST', url: 'Observation' },
      },
    ],
  },
});
assert.equal(transaction.type, 'transaction-response');
const [newPatient, observation] = transaction.entry.map((e) => e.resource);
assert.equal(observation.subject.reference, `Patient/${newPatient.id}`);

await client.delete({ resourceType: 'Patient', id: patient.id });
await assert.rejects(client.read({ resourceType: 'Patient', id: patient.id }), (err) => {
  assert.equal(err.response.status, 410);
  return true;
});

console.log(JSON.stringify({ patient: patient.id, transactionPatient: newPatient.id }));
