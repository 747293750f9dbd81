package jaiserve.tspatch;

import java.util.Arrays;
import java.util.List;
import javassist.CannotCompileException;
import javassist.ClassPool;
import javassist.CtClass;
import javassist.CtConstructor;
import javassist.CtMethod;
import javassist.CtNewMethod;

/**
 * TorchServe's token authorization made to behave like every OpenAI-compatible server's API key
 * (docs/front-door.md). TorchServe 0.12.0 writes new keys into key_file.json at every start, lets them
 * expire after token_expiration_min (60 by default) and answers a missing or wrong key with HTTP 400
 * InvalidKeyException, which the openai SDK raises as BadRequestError. Three fixes:
 *   6. TokenAuthorization.init: the keys of an existing key_file.json (management, inference, API) are
 *      read back instead of new ones being written, so a client's key survives a restart. Rotation stays
 *      TorchServe's own: POST /token?type=inference on the management address with the API key writes a
 *      new inference key, which this server checks from then on (the old one is refused), and which the
 *      next start reads back.
 *   7. TokenAuthorization.generateTokenExpiration: without a token_expiration_min line in
 *      config.properties a key never expires (key_file.json says "never"); with one, keys expire that many
 *      minutes after they are written, and a restart keeps the time the file states.
 *   8. TokenAuthorizationHandler.handleRequest: a missing or wrong key is HTTP 401 with
 *      `WWW-Authenticate: Bearer` and a body in the shape of the route (Unauthorized), on the inference
 *      and the management address alike; the check itself (which key for which address) is TorchServe's.
 * Checked like the batcher's fixes (Patches): methods by name and descriptor, call sites by count.
 */
final class KeyPatches {
    static final String TOKENS = "org.pytorch.serve.util.TokenAuthorization";
    static final String HANDLER = "org.pytorch.serve.http.TokenAuthorizationHandler";

    static final String FIX_KEPT = "the keys in key_file.json are read back at start instead of replaced"
            + " (TokenAuthorization.init)";
    static final String FIX_NO_EXPIRY = "keys never expire unless config.properties sets token_expiration_min"
            + " (TokenAuthorization.generateTokenExpiration, generateKeyFile)";
    static final String FIX_401 = "a missing or wrong key is 401 with WWW-Authenticate: Bearer, OpenAI's"
            + " error body under /v1 (TokenAuthorizationHandler.handleRequest)";

    private static final String TOKEN_TYPE = TOKENS + "$TokenType";
    private static final String TOKEN_TYPE_DESC = "L" + TOKEN_TYPE.replace('.', '/') + ";";
    private static final String EXPIRY = "token_expiration_min";
    private static final String REQUEST = "io.netty.handler.codec.http.FullHttpRequest";
    private static final String CONTEXT = "io.netty.channel.ChannelHandlerContext";
    private static final String READ_KEYS = "jaiReadKeyFile";
    private static final String AUTHORIZED = "jaiAuthorized";
    private static final String REFUSE = "jaiRefuse";

    private KeyPatches() {}

    /** The two classes, rewritten; a mismatch is added to {@code problems} (Patches.prepare refuses). */
    static List<Patched> prepare(ClassPool pool, List<String> problems) {
        Patched tokens = Patches.patch(pool, problems, TOKENS, Arrays.asList(FIX_KEPT, FIX_NO_EXPIRY),
                KeyPatches::expireOnlyWhenConfigured, KeyPatches::readBackKeyFile, KeyPatches::logWhenLoaded);
        Patched handler = Patches.patch(pool, problems, HANDLER, Arrays.asList(FIX_401),
                KeyPatches::refuseWith401);
        return Arrays.asList(tokens, handler);
    }

    /**
     * Fix 6: init's one generateKeyFile(TOKEN_API) call (which writes three new keys) runs only when
     * key_file.json cannot be read back. A file that exists but is not TorchServe's shape is replaced, and
     * the log says so.
     */
    private static void readBackKeyFile(CtClass tokens) throws Refusal, CannotCompileException {
        CtMethod init = Patches.declared(tokens, "init", "()V");
        String generate = "(" + TOKEN_TYPE_DESC + ")Z";
        Patches.expectCalls(init, TOKENS, "generateKeyFile", generate, 1);
        Patches.declared(tokens, "setFilePermissions", "()Z");
        Patches.declared(tokens, "generateTokenExpiration", "()Ljava/time/Instant;");
        refuseIfDeclared(tokens, READ_KEYS);
        tokens.addMethod(CtNewMethod.make(
                "private static boolean " + READ_KEYS + "() {"
                + "  java.nio.file.Path path = java.nio.file.Paths.get(keyFilePath, new String[0]);"
                + "  if (!java.nio.file.Files.isRegularFile(path, new java.nio.file.LinkOption[0])) { return false; }"
                + "  try {"
                + "    String text = new String(java.nio.file.Files.readAllBytes(path),"
                + "        java.nio.charset.StandardCharsets.UTF_8);"
                + "    com.google.gson.JsonObject file = new com.google.gson.JsonParser().parse(text).getAsJsonObject();"
                + "    com.google.gson.JsonObject management = file.getAsJsonObject(\"management\");"
                + "    com.google.gson.JsonObject inference = file.getAsJsonObject(\"inference\");"
                + "    String api = file.getAsJsonObject(\"API\").get(\"key\").getAsString();"
                + "    String managementRead = management.get(\"key\").getAsString();"
                + "    String inferenceRead = inference.get(\"key\").getAsString();"
                + "    if (api.isEmpty() || managementRead.isEmpty() || inferenceRead.isEmpty()) {"
                + "      throw new IllegalStateException(\"an empty key\");"
                + "    }"
                + "    java.time.Instant managementExpiry = jaiExpiry(management.get(\"expiration time\"));"
                + "    java.time.Instant inferenceExpiry = jaiExpiry(inference.get(\"expiration time\"));"
                + "    if (!setFilePermissions()) { throw new IllegalStateException(\"cannot make it rw-------\"); }"
                + "    apiKey = api;"
                + "    managementKey = managementRead;"
                + "    inferenceKey = inferenceRead;"
                + "    managementExpirationTimeMinutes = managementExpiry;"
                + "    inferenceExpirationTimeMinutes = inferenceExpiry;"
                + "    logger.info(\"" + Agent.NAME + ": keys read back from {} (inference key expires: {})\","
                + "        keyFilePath, jaiShow(inferenceExpiry));"
                + "    return true;"
                + "  } catch (Exception e) {"
                + "    logger.warn(\"" + Agent.NAME + ": {} is not a key file TorchServe wrote ({}): writing new keys\","
                + "        keyFilePath, e.toString());"
                + "    return false;"
                + "  }"
                + "}",
                tokens));
        Patches.replaceCall(init, TOKENS, "generateKeyFile", generate, 0,
                "{ $_ = " + READ_KEYS + "() || $proceed($$); }");
    }

    /**
     * Fix 7: generateTokenExpiration answers Instant.MAX (never) when config.properties has no
     * token_expiration_min (TorchServe's own default would be 60 minutes); generateKeyFile writes MAX as
     * "never". Reading a file back (fix 6): "never", or any time while no expiry is configured, becomes
     * generateTokenExpiration()'s answer; a stated time stands while an expiry is configured.
     */
    private static void expireOnlyWhenConfigured(CtClass tokens) throws Refusal, CannotCompileException {
        CtMethod expiration = Patches.declared(tokens, "generateTokenExpiration", "()Ljava/time/Instant;");
        Patches.expectCalls(expiration, "org.pytorch.serve.util.ConfigManager", "getTimeToExpiration",
                "()Ljava/lang/Double;", 1);
        CtMethod write = Patches.declared(tokens, "generateKeyFile", "(" + TOKEN_TYPE_DESC + ")Z");
        Patches.expectCalls(write, "java.time.Instant", "toString", "()Ljava/lang/String;", 2);
        refuseIfDeclared(tokens, "jaiExpiry");
        tokens.addMethod(CtNewMethod.make(
                "private static boolean jaiExpiryConfigured() {"
                + "  return org.pytorch.serve.util.ConfigManager.getInstance().getProperty(\"" + EXPIRY
                + "\", null) != null;"
                + "}", tokens));
        tokens.addMethod(CtNewMethod.make(
                "private static String jaiShow(java.time.Instant when) {"
                + "  return java.time.Instant.MAX.equals(when) ? \"never\" : when.toString();"
                + "}", tokens));
        tokens.addMethod(CtNewMethod.make(
                "private static java.time.Instant jaiExpiry(com.google.gson.JsonElement stated) {"
                + "  if (stated == null || !jaiExpiryConfigured() || \"never\".equals(stated.getAsString())) {"
                + "    return generateTokenExpiration();"
                + "  }"
                + "  return java.time.Instant.parse(stated.getAsString());"
                + "}", tokens));
        expiration.insertBefore("if (!jaiExpiryConfigured()) { return java.time.Instant.MAX; }");
        for (int i = 1; i >= 0; i--) {
            Patches.replaceCall(write, "java.time.Instant", "toString", "()Ljava/lang/String;", i,
                    "{ $_ = jaiShow($0); }");
        }
    }

    /**
     * Fix 8: the three checks in handleRequest (the token API's, management's, inference's) become "check,
     * and on a refusal answer 401 and stop": TorchServe's private checkTokenAuthorization threw
     * InvalidKeyException, which HttpRequestHandler answers with 400.
     */
    private static void refuseWith401(CtClass handler) throws Refusal, CannotCompileException {
        String handle = "(L" + CONTEXT.replace('.', '/') + ";L" + REQUEST.replace('.', '/')
                + ";Lio/netty/handler/codec/http/QueryStringDecoder;[Ljava/lang/String;)V";
        CtMethod handleRequest = Patches.declared(handler, "handleRequest", handle);
        String check = "(L" + REQUEST.replace('.', '/') + ";" + TOKEN_TYPE_DESC + ")V";
        Patches.expectCalls(handleRequest, HANDLER, "checkTokenAuthorization", check, 3);
        Patches.expectParameter(handleRequest, 1, "ctx", "L" + CONTEXT.replace('.', '/') + ";");
        refuseIfDeclared(handler, AUTHORIZED);
        handler.addMethod(CtNewMethod.make(
                "private static boolean " + AUTHORIZED + "(" + REQUEST + " req, " + TOKEN_TYPE + " type) {"
                + "  String bearer = req.headers().get(\"Authorization\");"
                + "  return bearer != null && " + TOKENS + ".checkTokenAuthorization("
                + "      " + TOKENS + ".parseTokenFromBearerTokenHeader(bearer), type);"
                + "}", handler));
        handler.addMethod(CtNewMethod.make(
                "private static void " + REFUSE + "(" + CONTEXT + " ctx, " + REQUEST + " req) {"
                + "  io.netty.handler.codec.http.FullHttpResponse response ="
                + "      new io.netty.handler.codec.http.DefaultFullHttpResponse("
                + "          io.netty.handler.codec.http.HttpVersion.HTTP_1_1,"
                + "          io.netty.handler.codec.http.HttpResponseStatus.UNAUTHORIZED);"
                + "  response.headers().set(\"Content-Type\", \"application/json\");"
                + "  response.headers().set(\"WWW-Authenticate\", \"" + Unauthorized.CHALLENGE + "\");"
                + "  response.content().writeCharSequence(jaiserve.tspatch.Unauthorized.body(req.uri()),"
                + "      java.nio.charset.StandardCharsets.UTF_8);"
                + "  org.pytorch.serve.util.NettyUtils.sendHttpResponse(ctx, response, true);"
                + "}", handler));
        for (int i = 2; i >= 0; i--) {
            Patches.replaceCall(handleRequest, HANDLER, "checkTokenAuthorization", check, i,
                    "{ if (!" + AUTHORIZED + "($1, $2)) { " + REFUSE + "(ctx, $1); return; } }");
        }
    }

    /** One line in logs/ts_log.log, through TokenAuthorization's own logger, when the JVM initializes it. */
    private static void logWhenLoaded(CtClass tokens) throws CannotCompileException {
        CtConstructor init = tokens.getClassInitializer();
        if (init == null) {
            init = tokens.makeClassInitializer();
        }
        String line = Agent.NAME + ": 3 fixes to TorchServe's token authorization: " + FIX_KEPT + "; "
                + FIX_NO_EXPIRY + "; " + FIX_401;
        init.insertAfter("org.slf4j.LoggerFactory.getLogger(\"" + TOKENS + "\").info(\"" + line + "\");");
    }

    private static void refuseIfDeclared(CtClass cls, String name) throws Refusal {
        for (CtMethod m : cls.getDeclaredMethods()) {
            if (m.getName().equals(name)) {
                throw new Refusal(cls.getName() + " already declares " + name + ": patched twice?");
            }
        }
    }
}
