// MedplumClient (@medplum/core), unchanged, against a running fhirq.
// Usage: node medplum.mjs SERVER_ROOT FHIR_PATH TAG ENTRIES
// Prints one JSON line of what it saw; exits non-zero when an assertion fails.
import assert from 'node:assert/strict';
import { MedplumClient } from '@medplum/core';

const [root, fhirPath, tag, size] = process.argv.slice(2);
const total = Number(size);
const system = 'urn:fhirq:test:medplum';

// Count the status answers the client receives, to show that it polled through 202s.
const polls = [];
const medplum = new MedplumClient({
  baseUrl: root,
  fhirUrlPath: fhirPath,
  fetch: async (url, init) => {
    const response = await fetch(url, init);
    if (String(url).includes('/_async/')) {
      polls.push({ status: response.status, location: response.headers.get('content-location') });
    }
    return response;
  },
});

// Plain REST through the client's own helpers.
const created = await medplum.createResource({
  resourceType: 'Patient',
  identifier: [{ system, value: `${tag}-rest` }],
  name: [{ family: `Rest${tag}` }],
});
assert.equal(created.meta.versionId, '1');
const read = await medplum.readResource('Patient', created.id);
assert.equal(read.name[0].family, `Rest${tag}`);
const found = await medplum.searchResources('Patient', { identifier: `${system}|${tag}-rest` });
assert.deepEqual(found.map((p) => p.id), [created.id]);

// A large batch as a job: Prefer: respond-async, then poll the status URL until it is done.
const bundle = {
  resourceType: 'Bundle',
  type: 'batch',
  entry: Array.from({ length: total }, (_, i) => ({
    resource: {
      resourceType: 'Patient',
      identifier: [{ system, value: `${tag}-${i}` }],
      name: [{ family: `Batch${i}` }],
    },
    request: { method: 'POST', url: 'Patient' },
  })),
};
const started = Date.now();
const response = await medplum.executeBatch(bundle, {
  headers: { Prefer: 'respond-async' },
  pollStatusOnAccepted: true,
});
const seconds = (Date.now() - started) / 1000;
assert.equal(response.resourceType, 'Bundle');
assert.equal(response.type, 'batch-response');
assert.equal(response.entry.length, total);
const statuses = new Set(response.entry.map((e) => e.response.status));
assert.deepEqual([...statuses], ['201 Created']);
assert.equal(response.entry[total - 1].resource.name[0].family, `Batch${total - 1}`);

console.log(JSON.stringify({ created: created.id, polls, seconds }));
