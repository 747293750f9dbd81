import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;
import io.netty.channel.ChannelHandlerContext;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.Map;
import org.pytorch.serve.util.codec.ModelRequestEncoder;
import org.pytorch.serve.util.messages.BaseModelRequest;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.util.messages.ModelInferenceRequest;
import org.pytorch.serve.util.messages.RequestInput;

/**
 * Encodes, with TorchServe's real ModelRequestEncoder, the batch a continuous handle() call is sent: a
 * request arriving now and one already running in the worker (cached in the backend). Prints, per
 * request of the frame, its headers and parameters as the Python worker would read them.
 * tests/test_torchserve_patch.py runs it with and without the agent and compares the lines.
 */
public final class EncoderProbe {
    public static void main(String[] args) throws Exception {
        ModelInferenceRequest batch = new ModelInferenceRequest("jai");
        for (String id : new String[] {"arriving", "running"}) {
            RequestInput input = new RequestInput(id);
            Map<String, String> headers = new LinkedHashMap<>(); // updateHeaders needs a ConfigManager
            headers.put("url_path", "v1/completions");
            headers.put("content-type", "application/json");
            input.setHeaders(headers);
            input.addParameter(new InputParameter("body", "{}".getBytes(StandardCharsets.UTF_8)));
            input.setCachedInBackend(id.equals("running"));
            batch.addRequest(input);
        }
        ByteBuf frame = Unpooled.buffer();
        Method encode = ModelRequestEncoder.class.getDeclaredMethod(
                "encode", ChannelHandlerContext.class, BaseModelRequest.class, ByteBuf.class);
        encode.setAccessible(true);
        encode.invoke(new ModelRequestEncoder(false), null, batch, frame);
        // the frame as ts/protocol/otf_message_handler.py reads it: 'I', then per request its id, headers
        // (name, value) until -1, parameters (name, content type, value) until -1; -1 ends the batch
        System.out.println("command " + (char) frame.readByte());
        for (int length; (length = frame.readInt()) != -1; ) {
            StringBuilder line = new StringBuilder(string(frame, length)).append(": headers [");
            for (int n; (n = frame.readInt()) != -1; ) {
                line.append(string(frame, n)).append('=').append(string(frame, frame.readInt())).append(' ');
            }
            line.append("] parameters [");
            for (int n; (n = frame.readInt()) != -1; ) {
                line.append(string(frame, n)).append(' ');
                string(frame, frame.readInt()); // content type
                frame.skipBytes(frame.readInt()); // value
            }
            System.out.println(line.append(']').toString().replace(" ]", "]"));
        }
        System.out.println("bytes left " + frame.readableBytes());
    }

    private static String string(ByteBuf frame, int length) {
        return frame.readCharSequence(length, StandardCharsets.UTF_8).toString();
    }
}
