package jaiserve.tspatch;

/**
 * The body of a 401 (KeyPatches, fix 8), in the shape of the route that was asked: OpenAI's error object
 * under .../v1/ (so the openai SDK raises AuthenticationError), TorchServe's {code, type, message}
 * everywhere else (the shape JAI's native API and TorchServe's own APIs answer errors in).
 * Called from TorchServe's patched TokenAuthorizationHandler; depends on nothing but the JDK.
 */
public final class Unauthorized {
    /** The WWW-Authenticate challenge (RFC 6750): the key goes in `Authorization: Bearer <key>`. */
    public static final String CHALLENGE = "Bearer";

    static final String NATIVE_MESSAGE = "Token Authorization failed: send 'Authorization: Bearer <key>' with"
            + " the inference key from key_file.json (management key on the management address)";
    static final String OPENAI_MESSAGE = "Incorrect API key provided. Send the inference key from"
            + " key_file.json as the API key ('Authorization: Bearer <key>').";

    private Unauthorized() {}

    /** The JSON body for a refused request to {@code uri} (path and query as the client sent them). */
    public static String body(String uri) {
        if (isOpenAI(uri)) {
            return "{\"error\": {\"message\": \"" + OPENAI_MESSAGE + "\", \"type\": \"invalid_request_error\","
                    + " \"param\": null, \"code\": \"invalid_api_key\"}}\n";
        }
        return "{\"code\": 401, \"type\": \"InvalidKeyException\", \"message\": \"" + NATIVE_MESSAGE + "\"}\n";
    }

    /** /predictions/MODEL/VERSION/v1[/...] (what nginx's /v1/ becomes) or /v1[/...]. */
    static boolean isOpenAI(String uri) {
        String path = uri == null ? "" : uri;
        int query = path.indexOf('?');
        if (query >= 0) {
            path = path.substring(0, query);
        }
        String[] parts = path.split("/", -1);  // "", "predictions", model, version, "v1", ...
        if (parts.length >= 2 && parts[1].equals("v1")) {
            return true;
        }
        return parts.length >= 5 && parts[1].equals("predictions") && parts[4].equals("v1");
    }
}
