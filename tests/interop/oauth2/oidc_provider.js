// node-oidc-provider as an OAuth2 token endpoint for the interop tests: the client credentials
// grant and token introspection enabled, two clients (client_secret_basic, client_secret_post)
// allowed the scope "api:read". Binds 127.0.0.1:0 and prints
// {"event":"listening","port":N,"issuer":...} once it is up, then one JSON line per token it
// issues ("issued") and per token request ("token_request"); stops on SIGTERM.
//
//   node oidc_provider.js '{"basic":{"id":"…","secret":"…"},"post":{"id":"…","secret":"…"}}'
import http from 'node:http';
import Provider from 'oidc-provider';

const clients = JSON.parse(process.argv[2]);
const log = (entry) => console.log(JSON.stringify(entry));
const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, {
    clients: [
      ['basic', 'client_secret_basic'],
      ['post', 'client_secret_post'],
    ].map(([kind, method]) => ({
      client_id: clients[kind].id,
      client_secret: clients[kind].secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: method,
      scope: 'api:read',
    })),
    scopes: ['api:read'],
    features: {
      clientCredentials: { enabled: true },
      introspection: { enabled: true },
      devInteractions: { enabled: false },
    },
    ttl: { ClientCredentials: 300 },
  });
  provider.on('server_error', (ctx, err) => log({ event: 'server_error', error: String(err) }));
  provider.on('grant.error', (ctx, err) => log({
    event: 'grant.error', error: err.error, description: err.error_description,
  }));
  provider.on('client_credentials.saved', (token) => log({
    event: 'issued', client_id: token.clientId, scope: token.scope,
  }));
  // oidc-provider takes client_secret_basic and client_secret_post interchangeably: record how
  // each token request authenticated, so the tests can check keyproxy used the method it was told.
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/token' && ctx.method === 'POST') {
      const body = ctx.oidc?.body ?? {};
      log({
        event: 'token_request',
        status: ctx.status,
        client_id: ctx.oidc?.client?.clientId ?? null,
        basic: /^basic /i.test(ctx.get('authorization')),
        form_secret: typeof body.client_secret === 'string',
        scope: body.scope ?? null,
      });
    }
  });
  server.on('request', provider.callback());
  log({ event: 'listening', port, issuer });
});
// Nothing to keep: the tokens live in memory and die with the test run.
process.on('SIGTERM', () => process.exit(0));
