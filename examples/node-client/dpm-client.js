#!/usr/bin/env node
// Example client of the daqif Data Product Manager in Node.js.
//
// It loads proto/daqif/v1/dpm.proto as it is (no generated code), queues a Data Acquisition,
// follows it with WatchDaqStatus until COMPLETED (or ABORTED) and reads QueryStorageStatus.
//
//   node dpm-client.js --spec SPEC.json [--address 127.0.0.1:12083] [--timeout SECONDS]
//                      [--tls-ca CA.pem [--tls-cert CLIENT.pem --tls-key CLIENT.key]]
//
// With --tls-ca (or an address written grpcs://HOST:PORT, as a TLS server's ready line prints it)
// the channel is TLS, trusting the CA given (else Node's default roots); --tls-cert and --tls-key
// show a client certificate to a server that asks for one (mutual TLS).
//
// The specification is sent as it is. It may name ESO keyword dictionaries, found by the DPM in its
// `dictionary_dirs` or among its built-in ones, e.g. "keywordDictionaries": ["ESO-VLT-DIC.DAQIF_TCS"]:
// then an ESO keyword they do not define (or of another type) is refused with INVALID_ARGUMENT
// naming it, and the product's values and comments follow the dictionary.
//
// SPEC.json is a Data Product Specification (src/daqif/schema/): `hdf5File` sources make
// <fileId>.h5, `fitsFile` sources (and a `fitsFile` target.source) make <fileId>.fits, e.g. ESO's
// shape: {"id": "X", "target": {"fileId": "X", "source": {"type": "fitsFile", "sourceName": "dcs",
// "location": "/data/dcs.fits"}}, "sources": [{"type": "fitsKeywords", ...}, {"type": "fitsFile",
// "sourceName": "fcs", "location": "fcs-host:/data/fcs.fits", "keywordRules": [...]}]}.
// A specification mixing both is refused (INVALID_ARGUMENT, printed as below).
//
// Prints one JSON object per line: {"event":"queued",...}, {"event":"status",...} for every
// change, {"event":"storage",...}. Exit code 0 when the DAQ completed, 1 on an error (the
// daqif.v1.DaqException from the rich status details is printed on stderr), 2 when aborted.
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DPM_PROTO = 'daqif/v1/dpm.proto';

function parseArgs(argv) {
  const args = { address: '127.0.0.1:12083', timeout: 120, spec: null, tlsCa: null, tlsCert: null, tlsKey: null };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    const value = argv[i + 1];
    if (key === '--address') { args.address = value; i++; }
    else if (key === '--spec') { args.spec = value; i++; }
    else if (key === '--timeout') { args.timeout = Number(value); i++; }
    else if (key === '--tls-ca') { args.tlsCa = value; i++; }
    else if (key === '--tls-cert') { args.tlsCert = value; i++; }
    else if (key === '--tls-key') { args.tlsKey = value; i++; }
    else if (key === '--help' || key === '-h') { args.help = true; }
    else { throw new Error(`unknown argument ${key}`); }
  }
  if (!args.help && !args.spec) throw new Error('--spec SPEC.json is required');
  if (!args.tlsCert !== !args.tlsKey) throw new Error('--tls-cert and --tls-key go together: give both');
  return args;
}

// The channel credentials and the target: TLS with any --tls-* flag or a grpcs:// address.
function channel(args) {
  const scheme = 'grpcs://';
  const tls = args.address.startsWith(scheme) || args.tlsCa || args.tlsCert;
  const target = args.address.startsWith(scheme) ? args.address.slice(scheme.length) : args.address;
  if (!tls) return { target, credentials: grpc.credentials.createInsecure() };
  const read = (file, what) => {
    if (!file) return null;
    try { return fs.readFileSync(file); } catch (err) { throw new Error(`cannot read the ${what} ${file}: ${err.message}`); }
  };
  const credentials = grpc.credentials.createSsl(
    read(args.tlsCa, 'CA certificate'), read(args.tlsKey, 'private key'), read(args.tlsCert, 'certificate'));
  return { target, credentials };
}

function loadServices() {
  const definition = protoLoader.loadSync(DPM_PROTO, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,      // field names as in the .proto: file_id, substate, ...
    enums: String,       // enum values by name: DAQ_SUB_STATE_COMPLETED
    longs: Number,
    defaults: true,
  });
  const daqif = grpc.loadPackageDefinition(definition).daqif.v1;
  return daqif;
}

// The rich error details: google.rpc.Status in the grpc-status-details-bin trailer, whose
// details hold a daqif.v1.DaqException.
const rpcTypes = (() => {
  const root = protobuf.parse(`
    syntax = "proto3";
    package google.rpc;
    message Any { string type_url = 1; bytes value = 2; }
    message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  `, { keepCase: true }).root;
  const daqRoot = new protobuf.Root();
  daqRoot.resolvePath = (origin, target) => path.resolve(PROTO_ROOT, target);
  daqRoot.loadSync(DPM_PROTO, { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    DaqException: daqRoot.lookupType('daqif.v1.DaqException'),
  };
})();

function describeError(err) {
  const codeName = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
  const result = { code: codeName, id: '', message: err.details || err.message };
  const raw = err.metadata && err.metadata.get('grpc-status-details-bin');
  if (raw && raw.length) {
    const status = rpcTypes.Status.decode(raw[0]);
    for (const detail of status.details) {
      if (detail.type_url.endsWith('/daqif.v1.DaqException')) {
        const exc = rpcTypes.DaqException.decode(detail.value);
        result.id = exc.id;
        result.message = exc.message;
      }
    }
  }
  return result;
}

function print(event, body) {
  process.stdout.write(JSON.stringify({ event, ...body }) + '\n');
}

function unary(client, method, request, deadlineSeconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + deadlineSeconds * 1000);
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function follow(daqClient, id, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutSeconds * 1000);
    const call = daqClient.WatchDaqStatus({ id }, { deadline });
    let done = false;
    call.on('data', (status) => {
      print('status', { status });
      if (status.substate === 'DAQ_SUB_STATE_COMPLETED' || status.substate === 'DAQ_SUB_STATE_ABORTED') {
        done = true;
        call.cancel();
        resolve(status);
      }
    });
    call.on('error', (err) => { if (!done) reject(err); });
    call.on('end', () => { if (!done) reject(new Error('status stream ended before the DAQ finished')); });
  });
}

async function main() {
  let args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`error: ${err.message}\n`);
    return 1;
  }
  if (args.help) {
    process.stdout.write('usage: node dpm-client.js --spec SPEC.json [--address HOST:PORT] [--timeout S]'
      + ' [--tls-ca CA.pem [--tls-cert CLIENT.pem --tls-key CLIENT.key]]\n');
    return 0;
  }
  let target, credentials;
  try {
    ({ target, credentials } = channel(args));
  } catch (err) {
    process.stderr.write(`error: ${err.message}\n`);
    return 1;
  }
  const daqif = loadServices();
  const daqClient = new daqif.DpmDaqControl(target, credentials);
  const dpmClient = new daqif.DpmControl(target, credentials);
  try {
    const specification = fs.readFileSync(args.spec, 'utf8');
    const reply = await unary(daqClient, 'QueueDaq', { specification }, 10);
    print('queued', { reply });
    const final = await follow(daqClient, reply.id, args.timeout);
    const storage = await unary(dpmClient, 'QueryStorageStatus', {}, 10);
    print('storage', { storage });
    return final.substate === 'DAQ_SUB_STATE_COMPLETED' ? 0 : 2;
  } catch (err) {
    if (err.code !== undefined && err.metadata) {
      const exc = describeError(err);
      process.stderr.write(`DaqException ${exc.code} id=${JSON.stringify(exc.id)}: ${exc.message}\n`);
    } else {
      process.stderr.write(`error: ${err.message}\n`);
    }
    return 1;
  } finally {
    daqClient.close();
    dpmClient.close();
  }
}

main().then((code) => { process.exitCode = code; });
