// A minimal Lambda Runtime API client (the loop the managed Node.js runtime runs): GET the next
// invocation, call the handler with (event, context), POST its result to /response, or
// {errorMessage, errorType} to /error when it throws. One keep-alive connection to the API.
//
// `streaming: true` answers as a function URL with InvokeMode RESPONSE_STREAM does (what
// awslambda.streamifyResponse + HttpResponseStream.from produce): a chunked POST with
// `Lambda-Runtime-Function-Response-Mode: streaming`, the JSON prelude {statusCode, headers,
// cookies}, eight NUL bytes, then the body.

import http from 'node:http';

const API = process.env.AWS_LAMBDA_RUNTIME_API ?? '127.0.0.1:9001';
const separator = API.lastIndexOf(':');
const HOST = API.slice(0, separator);
const PORT = Number(API.slice(separator + 1));
const BASE = '/2018-06-01/runtime';
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
const NULS = Buffer.alloc(8);

function send(method, path, headers, write) {
  return new Promise((resolve, reject) => {
    const request = http.request({ host: HOST, port: PORT, method, path, headers, agent }, (response) => {
      const chunks = [];
      response.on('data', (chunk) => chunks.push(chunk));
      response.on('end', () => resolve({ status: response.statusCode, headers: response.headers, body: Buffer.concat(chunks) }));
      response.on('error', reject);
    });
    request.on('error', reject);
    write(request);
  });
}

function postJson(path, value, headers = {}) {
  const body = Buffer.from(JSON.stringify(value));
  return send('POST', path, { 'content-type': 'application/json', 'content-length': body.length, ...headers },
    (request) => request.end(body));
}

function postStream(path, result) {
  const prelude = JSON.stringify({ statusCode: result.statusCode, headers: result.headers ?? {}, cookies: result.cookies ?? [] });
  const headers = {
    'content-type': 'application/vnd.awslambda.http-integration-response',
    'lambda-runtime-function-response-mode': 'streaming',
    'transfer-encoding': 'chunked',
    trailer: 'Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body',
  };
  return send('POST', path, headers, (request) => {
    request.write(prelude);
    request.write(NULS);
    if (result.body) request.write(result.isBase64Encoded ? Buffer.from(result.body, 'base64') : result.body);
    request.end();
  });
}

function errorBody(error) {
  return { errorMessage: String(error?.message ?? error), errorType: error?.name ?? 'Error' };
}

function contextFor(headers) {
  const deadline = Number(headers['lambda-runtime-deadline-ms']);
  if (headers['lambda-runtime-trace-id']) process.env._X_AMZN_TRACE_ID = headers['lambda-runtime-trace-id'];
  else delete process.env._X_AMZN_TRACE_ID;
  return {
    awsRequestId: headers['lambda-runtime-aws-request-id'],
    invokedFunctionArn: headers['lambda-runtime-invoked-function-arn'],
    functionName: process.env.AWS_LAMBDA_FUNCTION_NAME,
    functionVersion: process.env.AWS_LAMBDA_FUNCTION_VERSION,
    memoryLimitInMB: process.env.AWS_LAMBDA_FUNCTION_MEMORY_SIZE,
    deadlineMs: deadline,
    getRemainingTimeInMillis: () => deadline - Date.now(),
  };
}

/**
 * Builds the handler once (clients are constructed here, at init) and serves invocations
 * forever. An init failure is reported to /init/error and ends the process.
 */
export async function run(init, { streaming = false } = {}) {
  let handler;
  try {
    handler = await init();
  } catch (error) {
    process.stderr.write(`${error?.stack ?? error}\n`);
    await postJson(`${BASE}/init/error`, errorBody(error), { 'lambda-runtime-function-error-type': 'Runtime.InitError' })
      .catch(() => {});
    process.exit(1);
  }
  for (;;) {
    const next = await send('GET', `${BASE}/invocation/next`, {}, (request) => request.end());
    const context = contextFor(next.headers);
    const id = context.awsRequestId;
    let result;
    try {
      result = await handler(JSON.parse(next.body.toString('utf8')), context);
    } catch (error) {
      process.stderr.write(`${error?.stack ?? error}\n`);
      await postJson(`${BASE}/invocation/${id}/error`, errorBody(error),
        { 'lambda-runtime-function-error-type': 'Runtime.UnhandledError' });
      continue;
    }
    if (streaming) await postStream(`${BASE}/invocation/${id}/response`, result);
    else await postJson(`${BASE}/invocation/${id}/response`, result);
  }
}
